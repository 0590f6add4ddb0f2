#!/usr/bin/env python3
"""What padding costs an ONNX graph in ONNX Runtime on the CPU: each graph
runs the same batch shape (default 32 × 256) twice, once with every token
attended and once padded (random lengths 32..T, seed 0, the padding's ids
0 and its mask 0), taking turns run by run; medians.

    runs/venv-optimum/bin/python benchmarks/padded_batches.py GRAPH_DIR_OR_FILE ... [--runs 7]

The work is the same dense shape either way; a padded batch is slower only
if some kernel's speed depends on the values (RESULTS.md: the softmax of
the masked keys' large negative scores).
"""

import argparse
import os
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("graphs", nargs="+")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    b, t = args.batch, args.length
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(b, t)).astype(np.int64)
    lengths = rng.integers(32, t + 1, b)
    padded = np.zeros((b, t), np.int64)
    for i, n in enumerate(lengths):
        padded[i, :n] = 1
    batches = {"all attended": (np.ones((b, t), np.int64), ids), "padded": (padded, ids * padded)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sessions = []
    for g in args.graphs:
        path = os.path.join(g, "model.onnx") if os.path.isdir(g) else g
        sessions.append((g, ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])))

    def feed(session, mask, input_ids):
        names = {i.name for i in session.get_inputs()}
        f = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return {k: v for k, v in f.items() if k in names}

    times = {(g, c): [] for g, _ in sessions for c in batches}
    for r in range(args.runs + 1):
        for g, s in sessions:
            for c, (mask, input_ids) in batches.items():
                start = time.perf_counter()
                s.run(None, feed(s, mask, input_ids))
                if r > 0:  # the first round warms up
                    times[(g, c)].append(time.perf_counter() - start)
    print(f"ONNX Runtime {ort.__version__}, batch {b} × {t}, {args.threads} threads, "
          f"padded lengths {lengths.min()}..{lengths.max()} (mean {lengths.mean():.0f}), "
          f"median of {args.runs} interleaved runs\n")
    print("| graph | all attended ms | padded ms | padded / all attended |")
    print("|---|---:|---:|---:|")
    for g, _ in sessions:
        a, p = (1000 * np.median(times[(g, c)]) for c in batches)
        print(f"| {g} | {a:.0f} | {p:.0f} | {p / a:.2f} |")


if __name__ == "__main__":
    main()
