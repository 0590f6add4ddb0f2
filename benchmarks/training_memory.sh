#!/usr/bin/env bash
# Peak memory and step time of `effir finetune` without and with gradient
# checkpointing, in one run: the same config, data and steps, the two
# settings taking turns ROUNDS times. Prints a markdown table (median step
# time over the rounds' steps after the first; peak resident memory, which
# `effir finetune` reports) and the ratios.
#
#   benchmarks/training_memory.sh EFFIR MODEL CONFIG DATA STEPS ROUNDS [finetune flags...]
set -euo pipefail
effir=$1 model=$2 config=$3 data=$4 steps=$5 rounds=$6
shift 6
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for setting in false true; do
  { grep -v '^gradient_checkpointing:' "$config"; echo "gradient_checkpointing: $setting"; } \
    >"$work/config-$setting.yaml"
done
for round in $(seq "$rounds"); do
  for setting in false true; do
    out=$work/out-$setting-$round
    "$effir" finetune --quiet --model "$model" --train "$data" --config "$work/config-$setting.yaml" \
      --max-steps "$steps" --out "$out" "$@" 2>"$work/stderr-$setting-$round" >/dev/null \
      || { cat "$work/stderr-$setting-$round" >&2; exit 1; }
    grep -o 'peak resident memory [0-9]*' "$work/stderr-$setting-$round" | grep -o '[0-9]*$' \
      >"$work/peak-$setting-$round"
    # Seconds per step from the logged examples/s, first step left out.
    python3 - "$out/train_log.jsonl" "$config" >>"$work/steps-$setting" <<'EOF'
import json, sys, yaml
cfg = yaml.safe_load(open(sys.argv[2]))
per_step = cfg.get("batch_size", 16) * cfg.get("gradient_accumulation", 1)
for line in open(sys.argv[1]).read().splitlines()[1:]:
    print(per_step / json.loads(line)["examples_per_second"])
EOF
    echo "round $round, gradient_checkpointing $setting: peak $(cat "$work/peak-$setting-$round") bytes" >&2
  done
done
python3 - "$work" "$rounds" <<'EOF'
import statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for setting in ("false", "true"):
    peaks = [int(open(f"{work}/peak-{setting}-{r}").read()) for r in range(1, rounds + 1)]
    steps = [float(x) for x in open(f"{work}/steps-{setting}").read().split()]
    rows[setting] = (max(peaks), statistics.median(steps), len(steps))
print("| gradient checkpointing | peak resident memory | median s/step (steps) |")
print("|---|---:|---:|")
for setting, name in (("false", "off"), ("true", "on")):
    peak, step, n = rows[setting]
    print(f"| {name} | {peak / 1e9:.2f} GB | {step:.1f} ({n}) |")
off, on = rows["false"], rows["true"]
print(f"\nmemory on/off: {on[0] / off[0]:.2f}x; time per step on/off: {on[1] / off[1]:.2f}x")
EOF
