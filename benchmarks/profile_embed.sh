#!/usr/bin/env bash
# Where `effir embed` spends its time: perf samples of all-MiniLM-L6-v2
# embedding the first 256 SciFact abstracts (max length 256, batch 32),
# grouped by function, top 15. Needs `perf` (Debian linux-perf).
#   benchmarks/profile_embed.sh [MODEL_DIR] [EFFIR_BINARY]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-$root/models/all-MiniLM-L6-v2}
effir=${2:-$root/target/release/effir}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/docs.jsonl" <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from corpus_sample import scifact_documents, write_jsonl
write_jsonl(sys.argv[1], scifact_documents(256))
PY
perf record -q -F 499 -g -o "$work/perf.data" "$effir" embed --quiet --model "$model" \
  --input "$work/docs.jsonl" --output "$work/emb.npy" --max-length 256 --batch-size 32 >/dev/null
perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
  | grep -E '^ +[0-9.]+%' | head -15
