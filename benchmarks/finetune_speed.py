#!/usr/bin/env python3
"""Training speed: `effir finetune` vs sentence-transformers' trainer
(PyTorch CPU), same model, same examples (SciFact train query, positive and
one BM25 hard negative), same batch size, maximum length, loss (InfoNCE /
MultipleNegativesRankingLoss, scale 20 = temperature 0.05) and step count,
measured in one run. Prints examples/s of both and the ratio.

    python3 benchmarks/finetune_speed.py --model models/all-MiniLM-L6-v2 [--batch-size 16] [--max-length 256] [--steps 4]
"""

import argparse
import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def examples(count):
    data = ROOT / "data/scifact"
    corpus = {}
    with gzip.open(data / "corpus.jsonl.gz", "rt") as f:
        for line in f:
            d = json.loads(line)
            corpus[d["_id"]] = (d.get("title", "") + " " + d.get("text", "")).strip()
    out = []
    with gzip.open(data / "train_hard_negatives.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["pos_ids"] and r["neg_ids"]:
                out.append((r["query"], corpus[r["pos_ids"][0]], corpus[r["neg_ids"][0]]))
            if len(out) == count:
                break
    return out


def run_effir(args, triples, tmp):
    train = tmp / "train.jsonl"
    with open(train, "w") as f:
        for q, p, n in triples:
            f.write(json.dumps({"query": q, "pos": [p], "neg": [n]}) + "\n")
    config = tmp / "ft.yaml"
    config.write_text(
        f"max_steps: {args.steps}\nbatch_size: {args.batch_size}\nmax_length: {args.max_length}\n"
        "learning_rate: 2.0e-5\nhard_negatives: 1\ncheckpoint_every: 0\nfreeze_embeddings: false\n"
    )
    out = subprocess.run(
        [str(ROOT / "target/release/effir"), "finetune", "--quiet", "--model", args.model, "--train", str(train),
         "--config", str(config), "--out", str(tmp / "effir-out")],
        check=True, capture_output=True, text=True,
    ).stdout
    rate = float(re.search(r"\(([\d.]+) examples/s\)", out).group(1))
    return rate


def run_st(args, triples):
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch.set_num_threads(2)
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.max_length
    ds = Dataset.from_dict({
        "anchor": [t[0] for t in triples],
        "positive": [t[1] for t in triples],
        "negative": [t[2] for t in triples],
    })
    with tempfile.TemporaryDirectory() as out:
        targs = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=2e-5, save_strategy="no", report_to=[], logging_steps=1000,
            dataloader_drop_last=True, use_cpu=True, seed=0,
        )
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=ds,
                                             loss=MultipleNegativesRankingLoss(model, scale=20.0))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return args.steps * args.batch_size / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    triples = examples(args.batch_size * args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        effir = run_effir(args, triples, Path(tmp))
    st = run_st(args, triples)
    print(f"batch {args.batch_size} (+{args.batch_size} positives, +{args.batch_size} hard negatives), "
          f"max length {args.max_length}, {args.steps} steps, full fine-tuning")
    print(f"  effir finetune (candle CPU)           {effir:7.2f} examples/s")
    print(f"  sentence-transformers trainer (torch) {st:7.2f} examples/s")
    print(f"  ratio effir / sentence-transformers   {effir / st:7.2f}x")


if __name__ == "__main__":
    sys.exit(main())
