#!/usr/bin/env python3
"""Where ONNX Runtime spends a graph's time: its profiler's kernel times,
summed by operator and output shape, after its graph optimizations (so a
fused GELU shows as one `Gelu`, an unfused one as `Erf`, `Mul` and `Add`).

    runs/venv-optimum/bin/python benchmarks/ort_profile.py GRAPH [GRAPH ...] \
        [--batch 32] [--length 256] [--runs 4] [--threads 2] [--top 14]

Synthetic token ids (seed 0), every position attended; two warm-up runs are
left out of the sums. Prints, per graph, the median time of a run and the
largest shares of kernel time as a Markdown table.
"""

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort


def profile(path, batch, length, runs, threads):
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        ids = np.random.default_rng(0).integers(1000, 20000, size=(batch, length)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feed = {k: v for k, v in feed.items() if k in names}
        for _ in range(2 + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    model_runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][2:]
    first = model_runs[0]["ts"]
    by_kind = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            shape = e["args"].get("output_type_shape", [{}])
            dims = next(iter(shape[0].values()), []) if shape else []
            key = (e["args"]["op_name"], "×".join(map(str, dims)))
            by_kind[key] += e["dur"]
            count[key] += 1
    return np.median([r["dur"] for r in model_runs]) / 1000, by_kind, count, len(model_runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    print(f"ONNX Runtime {ort.__version__}, batch {args.batch} × {args.length}, {args.threads} threads, "
          f"{args.runs} profiled runs after 2 warm-up runs\n")
    for path in args.graphs:
        median, by_kind, count, runs = profile(path, args.batch, args.length, args.runs, args.threads)
        total = sum(by_kind.values())
        print(f"`{path}`: median run {median:.0f} ms\n")
        print("| operator | output shape | nodes | share of kernel time | ms per run |")
        print("|---|---|---:|---:|---:|")
        for (op, shape), t in by_kind.most_common(args.top):
            print(f"| {op} | {shape} | {count[(op, shape)] // runs} | {100 * t / total:.1f} % | {t / runs / 1000:.1f} |")
        print()


if __name__ == "__main__":
    main()
