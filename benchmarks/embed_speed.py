#!/usr/bin/env python3
"""Embedding speed: `effir embed` vs sentence-transformers (PyTorch CPU).

    python3 benchmarks/embed_speed.py [--model models/all-MiniLM-L6-v2] [--docs 2000]

Both embed the same SciFact abstracts (title + " " + text) with the same
maximum length and batch size, `--repeats` times, alternating; the script
prints each engine's median documents/second (model loading excluded: effir's
own timing line, and `encode()` alone for sentence-transformers), their ratio,
and the agreement of the two sets of embeddings.
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

    effir_rates, st_rates = [], []
    for r in range(args.repeats):
        out = tmp / "effir.npy"
        run = subprocess.run(
            [args.effir, "embed", "--quiet", "--model", args.model, "--input", str(inp), "--output", str(out),
             "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, check=True)
        seconds = float(re.search(r"in ([0-9.]+)s", run.stderr).group(1))
        effir_rates.append(len(docs) / seconds)

        start = time.perf_counter()
        ref = st.encode(docs, batch_size=args.batch_size, convert_to_numpy=True)
        st_rates.append(len(docs) / (time.perf_counter() - start))
        print(f"run {r + 1}: effir {effir_rates[-1]:.1f} docs/s, sentence-transformers {st_rates[-1]:.1f} docs/s",
              flush=True)

    ours = np.load(out)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    e, s = statistics.median(effir_rates), statistics.median(st_rates)
    print(f"\n{len(docs)} SciFact abstracts, max length {args.max_length}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} runs (medians):")
    print(f"  effir                 {e:8.1f} docs/s")
    print(f"  sentence-transformers {s:8.1f} docs/s")
    print(f"  ratio effir / ST      {e / s:8.2f}x")
    print(f"  agreement: min cosine {cos.min():.6f}, max |diff| {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
    main()
