#!/usr/bin/env bash
# Where `effir finetune` spends its time: perf samples of all-MiniLM-L6-v2
# training the `make bench-finetune` steps (batch 16 queries + 16 positives
# + 16 hard negatives, max length 256, full fine-tuning), grouped by
# function, top 20. Needs `perf` (Debian linux-perf).
#   benchmarks/profile_finetune.sh [MODEL_DIR] [STEPS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-$root/models/all-MiniLM-L6-v2}
steps=${2:-2}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
read -r -a command < <(python3 "$root/benchmarks/finetune_speed.py" --model "$model" --steps "$steps" \
  --print-effir-command "$work")
perf record -q -F 199 -g -o "$work/perf.data" "${command[@]}" >/dev/null
perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
  | grep -E '^ +[0-9.]+%' | head -20
