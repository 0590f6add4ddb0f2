#!/usr/bin/env python3
"""Embedding speed: `effir embed` (candle) vs sentence-transformers (PyTorch
CPU) vs ONNX Runtime on effir's own export of the same model.

    python3 benchmarks/embed_speed.py [--model models/all-MiniLM-L6-v2] [--docs 2000] \
        [--onnx runs/onnx/minilm-st] [--prompt document]

All engines embed the same SciFact abstracts (title + " " + text, after the
model's `--prompt` if given) with the same maximum length, batch size and 2
threads, `--repeats` times, interleaved; the script prints each engine's
median documents/second (model loading excluded: effir's own timing line,
`encode()` alone for sentence-transformers, tokenization and runs for ONNX
Runtime), the ratios, and the agreement of the embeddings. `--onnx` is an
`effir export --profile sentence-transformers` directory; ONNX Runtime gets
length-sorted batches padded per batch, as effir and sentence-transformers
build them.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_sample import ROOT, scifact_documents, write_jsonl  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    ap.add_argument("--effir", default=str(ROOT / "target/release/effir"))
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--onnx", help="effir export (sentence-transformers profile) of the same model")
    ap.add_argument("--prompt", help="the model's prompt name for documents (e.g. document)")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    docs = scifact_documents(args.docs)
    tmp = Path(tempfile.mkdtemp())
    inp = tmp / "docs.jsonl"
    write_jsonl(inp, docs)
    st = SentenceTransformer(args.model, device="cpu")
    st.max_seq_length = args.max_length
    prefix = st.prompts.get(args.prompt, "") if args.prompt else ""
    if args.prompt and not prefix:
        sys.exit(f"{args.model}: no non-empty `{args.prompt}` prompt")
    ort_encode = onnx_encoder(args, prefix) if args.onnx else None
    prompt_args = ["--prompt", args.prompt] if args.prompt else []

    effir_rates, st_rates, ort_rates = [], [], []
    for r in range(args.repeats):
        out = tmp / "effir.npy"
        run = subprocess.run(
            [args.effir, "embed", "--quiet", "--model", args.model, "--input", str(inp), "--output", str(out),
             "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)] + prompt_args,
            capture_output=True, text=True, check=True)
        seconds = float(re.search(r"in ([0-9.]+)s", run.stderr).group(1))
        effir_rates.append(len(docs) / seconds)

        start = time.perf_counter()
        ref = st.encode(docs, batch_size=args.batch_size, convert_to_numpy=True,
                        **({"prompt_name": args.prompt} if args.prompt else {}))
        st_rates.append(len(docs) / (time.perf_counter() - start))
        line = f"run {r + 1}: effir {effir_rates[-1]:.1f} docs/s, sentence-transformers {st_rates[-1]:.1f} docs/s"
        if ort_encode:
            start = time.perf_counter()
            ort_emb = ort_encode(docs)
            ort_rates.append(len(docs) / (time.perf_counter() - start))
            line += f", ONNX Runtime {ort_rates[-1]:.1f} docs/s"
        print(line, flush=True)

    ours = np.load(out)
    e, s = statistics.median(effir_rates), statistics.median(st_rates)
    print(f"\n{args.model}: {len(docs)} SciFact abstracts{' (prompt ' + args.prompt + ')' if args.prompt else ''}, "
          f"max length {args.max_length}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved runs (medians):")
    print(f"  effir (candle)        {e:8.1f} docs/s")
    print(f"  sentence-transformers {s:8.1f} docs/s")
    if ort_encode:
        o = statistics.median(ort_rates)
        print(f"  ONNX Runtime          {o:8.1f} docs/s (effir's export, {args.onnx})")
    print(f"  ratio effir / ST      {e / s:8.2f}x")
    if ort_encode:
        print(f"  ratio effir / ORT     {e / o:8.2f}x")
    print(f"  agreement with ST: min cosine {cosine(ours, ref).min():.6f}, max |diff| {np.abs(ours - ref).max():.2e}")
    if ort_encode:
        print(f"  agreement ORT with ST: min cosine {cosine(ort_emb, ref).min():.6f}")


def cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def onnx_encoder(args, prefix):
    """A function embedding texts through ONNX Runtime (2 threads) on the
    export's `sentence_embedding`, in length-sorted batches padded per batch."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    export = Path(args.onnx)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(export / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(args.max_length)

    def encode(texts):
        encs = tok.encode_batch([prefix + t for t in texts])
        order = sorted(range(len(texts)), key=lambda i: -len(encs[i].ids))
        out = np.zeros((len(texts), session.get_outputs()[-1].shape[-1]), np.float32)
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            width = max(len(encs[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), np.int64)
            mask = np.zeros((len(idx), width), np.int64)
            for row, i in enumerate(idx):
                n = len(encs[i].ids)
                ids[row, :n] = encs[i].ids
                mask[row, :n] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            out[idx] = session.run(["sentence_embedding"], feeds)[0]
        return out

    return encode


if __name__ == "__main__":
    main()
