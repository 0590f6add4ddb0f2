#!/usr/bin/env python3
"""Training speed: `effir finetune` vs sentence-transformers' trainer
(PyTorch CPU), same model, same examples (SciFact train query, positive and
one BM25 hard negative), same batch size, maximum length, loss (InfoNCE /
MultipleNegativesRankingLoss, scale 20 = temperature 0.05) and step count.
Each side runs in its own process, the two alternating for `--rounds`
rounds; prints the median examples/s and peak RSS of each and the ratio.

    python3 benchmarks/finetune_speed.py --model models/all-MiniLM-L6-v2 [--batch-size 16] [--max-length 256] [--steps 4] [--rounds 3]
"""

import argparse
import gzip
import json
import os
import re
import statistics
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


def effir_command(args, triples, tmp):
    """Writes the examples and the settings to `tmp`; returns the `effir finetune` command."""
    train = tmp / "train.jsonl"
    with open(train, "w") as f:
        for q, p, n in triples:
            f.write(json.dumps({"query": q, "pos": [p], "neg": [n]}) + "\n")
    config = tmp / "ft.yaml"
    config.write_text(
        f"max_steps: {args.steps}\nbatch_size: {args.batch_size}\nmax_length: {args.max_length}\n"
        "learning_rate: 2.0e-5\nhard_negatives: 1\ncheckpoint_every: 0\nfreeze_embeddings: false\n"
    )
    return [str(ROOT / "target/release/effir"), "finetune", "--quiet", "--model", args.model, "--train", str(train),
            "--config", str(config), "--out", str(tmp / "effir-out")]


def run_effir(args, triples, tmp):
    out, rss = run_measured(effir_command(args, triples, tmp))
    return float(re.search(r"\(([\d.]+) examples/s\)", out).group(1)), rss


def run_measured(command, stderr=None):
    """Runs `command`; returns its standard output and its peak RSS in GB."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{command[0]} failed with exit code {proc.returncode}")
    return out, usage.ru_maxrss / 1e6


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
    print(f"rate {args.steps * args.batch_size / seconds}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--st-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--print-effir-command", metavar="DIR",
                    help="write effir's inputs to DIR and print its command (for profiling); run nothing")
    args = ap.parse_args()
    triples = examples(args.batch_size * args.steps)
    if args.print_effir_command:
        return print(" ".join(effir_command(args, triples, Path(args.print_effir_command))))
    if args.st_only:
        return run_st(args, triples)
    st_command = [sys.executable, __file__, "--st-only", "--model", args.model, "--batch-size", str(args.batch_size),
                  "--max-length", str(args.max_length), "--steps", str(args.steps)]
    effir, st = [], []
    for round in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            effir.append(run_effir(args, triples, Path(tmp)))
        out, rss = run_measured(st_command, stderr=subprocess.DEVNULL)
        st.append((float(re.search(r"rate ([\d.]+)", out).group(1)), rss))
        print(f"round {round + 1}: effir {effir[-1][0]:.2f} examples/s ({effir[-1][1]:.2f} GB), "
              f"sentence-transformers {st[-1][0]:.2f} examples/s ({st[-1][1]:.2f} GB)", flush=True)
    median = lambda runs, i: statistics.median(r[i] for r in runs)
    print(f"batch {args.batch_size} (+{args.batch_size} positives, +{args.batch_size} hard negatives), "
          f"max length {args.max_length}, {args.steps} steps, full fine-tuning, medians of {args.rounds} interleaved rounds")
    print(f"  effir finetune (candle CPU)           {median(effir, 0):7.2f} examples/s   peak RSS {median(effir, 1):5.2f} GB")
    print(f"  sentence-transformers trainer (torch) {median(st, 0):7.2f} examples/s   peak RSS {median(st, 1):5.2f} GB")
    print(f"  ratio effir / sentence-transformers   {median(effir, 0) / median(st, 0):7.2f}x")


if __name__ == "__main__":
    sys.exit(main())
