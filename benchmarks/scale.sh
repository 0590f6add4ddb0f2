#!/usr/bin/env bash
# `make scale-7b` / `make scale-3b` (issue #18): a random-weight model of
# the EffiR paper's scale, analyzed, pruned and exported one layer at a
# time (`--stream`), each stage under `/usr/bin/time -v` for its peak RSS
# and wall time; with `validate`, also candle against ONNX Runtime on 8
# texts. Writes results/scale/SHAPE/{summary.md,*.time,*.log}.
#
#   benchmarks/scale.sh SHAPE [validate]
#
# Stages rerun from scratch; the synthetic model is kept (same bytes for
# the same shape and seed). EFFIR, SYNTHETIC and PYTHON may point at
# other binaries.
set -euo pipefail
shape=$1
validate=${2:-}
EFFIR=${EFFIR:-target/release/effir}
SYNTHETIC=${SYNTHETIC:-target/release/examples/synthetic_model}
PYTHON=${PYTHON:-runs/venv-transformers/bin/python}
DATA=${DATA:-data/scifact}
work=runs/scale/$shape
results=results/scale/$shape
mkdir -p "$work" "$results"
model=$work/model
if [ ! -f "$model/config.json" ]; then
  "$SYNTHETIC" "$shape" "$model"
fi

stage() {
  local name=$1
  shift
  echo "== $name: $*"
  if ! /usr/bin/time -v -o "$results/$name.time" "$@" >"$results/$name.log" 2>&1; then
    tail -20 "$results/$name.log"
    echo "$name failed" >&2
    exit 1
  fi
  grep -E 'Elapsed|Maximum resident' "$results/$name.time"
}

rm -rf "$work/analysis" "$work/pruned" "$work/onnx"
stage analyze "$EFFIR" analyze --model "$model" --data "$DATA" --calib-tokens 1024 \
  --out "$work/analysis" --stream --quiet
stage prune "$EFFIR" prune --model "$model" --data "$DATA" --calib-tokens 1024 \
  --drop-mlp 8 --mlp-keep 0.5 --out "$work/pruned" --stream
stage export "$EFFIR" export --model "$work/pruned" --out "$work/onnx" --fp16 \
  --external-data always --stream
stage onnx-checker "$PYTHON" -c \
  'import onnx, sys; onnx.checker.check_model(sys.argv[1], full_check=True); print("onnx.checker: ok")' \
  "$work/onnx/model.onnx"
stages="analyze prune export onnx-checker"
if [ "$validate" = validate ]; then
  stage validate "$EFFIR" validate --reference "$work/pruned" --candidate "$work/onnx" \
    --data "$DATA" --gates configs/gates-parity.yaml --parity-texts 8 --batch-size 4 --max-length 256 \
    --stream --graph-optimization none --no-card --quiet --out "$results/validation"
  stages="$stages validate"
fi
cp "$work/analysis/importance.md" "$results/"
"$PYTHON" benchmarks/scale_summary.py "$shape" "$model" "$results" $stages
