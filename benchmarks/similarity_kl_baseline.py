#!/usr/bin/env python3
"""The similarity KL a student scores if all its in-batch scores are equal:
KL(teacher || uniform) over each text's batch neighbours, averaged over rows,
for all-MiniLM-L6-v2 on random SciFact abstracts. A distillation run whose
`similarity_kl` stays near this has collapsed; below it, the student's
scores follow the teacher's.

    runs/venv-optimum/bin/python benchmarks/similarity_kl_baseline.py [--batches 10] [--batch-size 32] [--temperature 0.05]
"""

import argparse
import gzip
import json

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--data", default="data/scifact")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.05)
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    with gzip.open(f"{args.data}/corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    n = args.batches * args.batch_size
    chosen = np.random.default_rng(0).permutation(len(docs))[:n]
    texts = [(docs[i].get("title", "") + " " + docs[i]["text"]).strip() for i in chosen]
    st = SentenceTransformer(args.model, device="cpu")
    st.max_seq_length = 256
    e = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
    kls = []
    for b in range(args.batches):
        x = e[b * args.batch_size : (b + 1) * args.batch_size]
        scores = x @ x.T / args.temperature
        for i in range(len(x)):
            row = np.delete(scores[i], i)
            p = np.exp(row - row.max())
            p /= p.sum()
            kls.append(np.log(len(row)) + float((p * np.log(p + 1e-30)).sum()))
    print(f"KL(teacher || equal scores over the other {args.batch_size - 1}), mean over {len(kls)} rows: {np.mean(kls):.4f}")


if __name__ == "__main__":
    main()
