#!/usr/bin/env python3
"""Reference retrieval scores: sentence-transformers encodes a BEIR dataset
(document text = title + " " + text, as BEIR does), exact cosine search,
pytrec_eval scores it (MRR@k as recip_rank over each query's top k).

    python3 benchmarks/reference_eval.py --data data/cranfield --out tests/fixtures/eval/cranfield-minilm-st.json

`effir eval` must agree with these numbers (tests/test_eval_minilm.rs for
Cranfield; `make eval-scifact` prints SciFact beside the reference).
"""

import argparse
import functools
import gzip
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests/fixtures/eval"))
from make_metric_reference import evaluate, read_qrels  # noqa: E402


def read_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", help="write the mean metrics here (JSON)")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    data = Path(args.data)
    qrels = read_qrels(data / "qrels" / f"{args.split}.tsv")
    corpus = read_jsonl(data / "corpus.jsonl.gz")
    queries = [q for q in read_jsonl(data / "queries.jsonl.gz") if q["_id"] in qrels]
    st = SentenceTransformer(args.model, device="cpu")
    st.max_seq_length = args.max_length
    docs = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    d = st.encode(docs, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    q = st.encode([x["text"] for x in queries], batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    scores = q @ d.T
    run = {}
    for i, query in enumerate(queries):
        top = np.argsort(-scores[i])[:1000]
        run[query["_id"]] = {corpus[j]["_id"]: float(scores[i, j]) for j in top}
    result = evaluate(run, qrels)["mean"]
    result = {k: round(v, 6) for k, v in result.items()}
    print(json.dumps({"model": Path(args.model).name, "dataset": data.name, "max_length": args.max_length,
                      "mean": result}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": Path(args.model).name, "dataset": data.name,
                                              "split": args.split, "max_length": args.max_length,
                                              "engine": "sentence-transformers + pytrec_eval",
                                              "mean": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
