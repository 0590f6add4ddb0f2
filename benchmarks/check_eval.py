#!/usr/bin/env python3
"""Compares an `effir eval` metrics.json with a reference (reference_eval.py
output) and exits non-zero when a metric differs by more than --tolerance.

    python3 benchmarks/check_eval.py runs/scifact/metrics.json tests/fixtures/eval/scifact-minilm-st.json
"""

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics")
    ap.add_argument("reference")
    ap.add_argument("--tolerance", type=float, default=0.002)
    ap.add_argument("--metric", action="append", default=None)
    args = ap.parse_args()
    ours = json.load(open(args.metrics))["mean"]
    ref = json.load(open(args.reference))
    ok = True
    print(f"{'metric':<12} {'effir':>8} {ref.get('engine', 'reference'):>36} {'diff':>8}")
    for m in args.metric or ["ndcg@10", "recall@100", "mrr@10", "mrr"]:
        diff = ours[m] - ref["mean"][m]
        ok &= abs(diff) <= args.tolerance
        print(f"{m:<12} {ours[m]:8.4f} {ref['mean'][m]:36.4f} {diff:+8.4f}")
    print("agreement within", args.tolerance, "ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
