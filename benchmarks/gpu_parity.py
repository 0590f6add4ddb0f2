"""Parity of the embeddings benchmarks/gpu_checks.sh made on a GPU with those made on this CPU.

  gpu_parity.py GPU_OUT CPU_REF > parity.json
  gpu_parity.py --pair LABEL GPU_SHARD REF_SHARD [--pair ...] > parity.json

GPU_OUT holds {queries,docs}-<graph>/ shards (effir encode) from the GPU run;
CPU_REF holds the same texts encoded here: {queries,docs}-fp32/ by the float32
export (the reference every gate compares with) and {queries,docs}-<graph>-cpu/
by the same graph on the CPU. Rows are matched by id, never by position.
"""
import json
import os
import sys

import numpy as np


def load(path):
    ids = open(os.path.join(path, "ids.txt")).read().split("\n")
    ids = [i for i in ids if i]
    emb = np.load(os.path.join(path, "embeddings.npy")).astype(np.float64)
    assert len(ids) == len(emb), path
    return dict(zip(ids, emb))


def compare(a, b):
    ids = sorted(a)
    assert sorted(b) == ids, "different texts"
    x = np.stack([a[i] for i in ids])
    y = np.stack([b[i] for i in ids])
    finite = bool(np.isfinite(x).all())
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return {
        "texts": len(ids),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(x - y).max()),
        "all_finite": finite,
    }


if sys.argv[1] == "--pair":
    # gpu_parity.py --pair LABEL GPU_SHARD REF_SHARD [--pair ...]: any pairs.
    args = sys.argv[1:]
    report = {}
    while args:
        assert args[0] == "--pair" and len(args) >= 4, "--pair LABEL GPU_SHARD REF_SHARD"
        report[args[1]] = compare(load(args[2]), load(args[3]))
        args = args[4:]
    json.dump(report, sys.stdout, indent=1)
    print()
    sys.exit(0)
gpu, cpu = sys.argv[1], sys.argv[2]
report = {}
for graph in ["minilm-fp32-w16", "minilm-fp16", "minilm-qdq"]:
    for kind in ["queries", "docs"]:
        on_gpu = load(os.path.join(gpu, f"{kind}-{graph}"))
        row = {"vs_cpu_fp32_export": compare(on_gpu, load(os.path.join(cpu, f"{kind}-fp32")))}
        same = os.path.join(cpu, f"{kind}-{graph}-cpu")
        if os.path.isdir(same):
            row["vs_same_graph_on_cpu"] = compare(on_gpu, load(same))
        report[f"{graph}/{kind}"] = row
json.dump(report, sys.stdout, indent=1)
print()
