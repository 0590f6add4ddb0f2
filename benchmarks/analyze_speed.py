#!/usr/bin/env python3
"""`effir analyze` speed: seconds per 1,000 calibration tokens.

    python3 benchmarks/analyze_speed.py [--model models/all-MiniLM-L6-v2] [--tokens 16384] [--repeats 5]

Runs `effir analyze` `--repeats` times on the same SciFact calibration sample
(every run measures every attention and MLP sub-layer with the padding
masked) and prints each run's `seconds_per_1000_tokens` from its
`importance.json` (model loading excluded), their median and their spread.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    ap.add_argument("--data", default=str(ROOT / "data/scifact"))
    ap.add_argument("--tokens", type=int, default=16384, help="calibration token budget")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--effir", default=str(ROOT / "target/release/effir"))
    args = ap.parse_args()

    per_1000 = []
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.repeats):
            out = Path(work) / f"run-{i}"
            cmd = [args.effir, "analyze", "--quiet", "--model", args.model, "--data", args.data,
                   "--calib-tokens", str(args.tokens), "--out", str(out)]
            if args.max_length:
                cmd += ["--max-length", str(args.max_length)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            report = json.loads((out / "importance.json").read_text())
            per_1000.append(report["seconds_per_1000_tokens"])
            tokens = report["calibration"]["tokens"]
            print(f"run {i + 1}: {tokens} tokens, {report['seconds']:.2f} s, "
                  f"{per_1000[-1]:.3f} s per 1,000 tokens", flush=True)
    print(f"{Path(args.model).name}: median {statistics.median(per_1000):.3f} s per 1,000 calibration tokens "
          f"(min {min(per_1000):.3f}, max {max(per_1000):.3f}, {args.repeats} runs of {tokens} tokens)")


if __name__ == "__main__":
    sys.exit(main())
