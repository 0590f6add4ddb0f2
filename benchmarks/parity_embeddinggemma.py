#!/usr/bin/env python3
"""EmbeddingGemma-300M parity: `effir embed` vs sentence-transformers, or
(with --onnx) effir's ONNX export run by Python onnxruntime vs
sentence-transformers.

    python3 benchmarks/parity_embeddinggemma.py [--model models/embeddinggemma-300m] [--onnx EXPORT_DIR]

Embeds SciFact queries with the model's `query` prompt and SciFact abstracts
with its `document` prompt, in both engines, and prints the minimum and mean
cosine and the maximum absolute difference per prompt. Exits non-zero when a
text falls below cosine 0.99999 or above 1e-4 absolute difference.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_sample import ROOT, scifact_documents, scifact_queries, write_jsonl  # noqa: E402

MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4


def onnx_embed(export_dir, st, texts, prompt):
    """`sentence_embedding` of the exported graph under Python onnxruntime,
    fed the token ids sentence-transformers' own tokenizer produces."""
    import onnxruntime as ort

    graph = Path(export_dir) / "model.onnx"
    if not graph.exists():
        graph = Path(export_dir) / "onnx" / "model.onnx"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    prefix = st.prompts[prompt]
    rows = []
    for i in range(0, len(texts), 8):
        features = st.tokenize([prefix + t for t in texts[i:i + 8]])
        feeds = {"input_ids": features["input_ids"].numpy().astype(np.int64),
                 "attention_mask": features["attention_mask"].numpy().astype(np.int64)}
        rows.append(session.run(["sentence_embedding"], feeds)[0])
    return np.concatenate(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/embeddinggemma-300m"))
    ap.add_argument("--effir", default=str(ROOT / "target/release/effir"))
    ap.add_argument("--texts", type=int, default=32, help="texts per prompt")
    ap.add_argument("--onnx", help="an `effir export --profile sentence-transformers` directory")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    st = SentenceTransformer(args.model, device="cpu")
    tmp = Path(tempfile.mkdtemp())
    ok = True
    for prompt, texts in [("query", scifact_queries(args.texts)), ("document", scifact_documents(args.texts))]:
        inp, out = tmp / f"{prompt}.jsonl", tmp / f"{prompt}.npy"
        if args.onnx:
            ours = onnx_embed(args.onnx, st, texts, prompt)
        else:
            write_jsonl(inp, texts)
            subprocess.run([args.effir, "embed", "--quiet", "--model", args.model, "--input", str(inp),
                            "--output", str(out), "--prompt", prompt, "--batch-size", "8"], check=True)
            ours = np.load(out)
        ref = st.encode(texts, prompt_name=prompt, batch_size=8, convert_to_numpy=True)
        cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
        diff = np.abs(ours - ref).max()
        passed = cos.min() >= MIN_COSINE and diff <= MAX_ABS_DIFF
        ok &= passed
        print(f"{prompt:9s} {len(texts)} texts: min cosine {cos.min():.7f}, mean cosine {cos.mean():.7f}, "
              f"max |diff| {diff:.2e} -> {'ok' if passed else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
