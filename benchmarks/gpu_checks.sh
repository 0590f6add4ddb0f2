#!/usr/bin/env bash
# The GPU checks of issue #13, run on a machine with an NVIDIA GPU.
#
#   benchmarks/gpu_checks.sh ORT_LIB_DIR GRAPHS_DIR TEXTS_DIR OUT_DIR
#
# ORT_LIB_DIR  an onnxruntime-gpu build: libonnxruntime.so (+ its providers)
# GRAPHS_DIR   effir exports: minilm-fp32-w16 (export --fp16: float16
#              storage, float32 arithmetic), minilm-fp16 (--precision fp16),
#              minilm-qdq (--target tensorrt --precision int8)
# TEXTS_DIR    a BEIR folder whose corpus is the texts to embed for parity
#              (benchmarks/gpu_checks_prep.sh writes SciFact's and
#              Cranfield's queries there)
# OUT_DIR      logs, bench.json, eval reports and the embeddings
#
# Needs target/release/effir and the test binary of tests/test_onnx_export.rs
# (EFFIR_TEST_BIN). Every step runs even when an earlier one fails; the
# summary at the end lists each step's exit status. The embeddings are
# compared with the CPU's by benchmarks/gpu_parity.py on the machine that
# made the exports.
#
# PROVIDER (default cuda), EVAL_DATA (default "data/scifact data/cranfield")
# and DOCS (default data/cranfield) let the script be tried on a CPU first.
set -u
LIB=$1 GRAPHS=$2 TEXTS=$3 OUT=$4
PROVIDER=${PROVIDER:-cuda}
EVAL_DATA=${EVAL_DATA:-data/scifact data/cranfield}
DOCS=${DOCS:-data/cranfield}
mkdir -p "$OUT"
declare -a SUMMARY
step() { # step NAME COMMAND...: run, log to OUT/NAME.log, remember the status
    local name=$1; shift
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    SUMMARY+=("$name: exit $rc in $((SECONDS - start)) s")
    echo "== $name: exit $rc"; tail -n 15 "$OUT/$name.log"
}

# shellcheck source=benchmarks/gpu_onnxruntime_env.sh
. "$(dirname "$0")/gpu_onnxruntime_env.sh"
EFFIR=target/release/effir

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    echo "library dirs: $libdirs"
    echo "TensorRT (libnvinfer): $(echo "$libdirs" | tr : '\n' | while read -r d; do ls "$d"/libnvinfer.so* 2>/dev/null; done | head -1)"
    echo "unresolved in the CUDA provider:"
    ldd "$LIB/libonnxruntime_providers_cuda.so" | grep 'not found'
    echo "unresolved in the TensorRT provider:"
    ldd "$LIB/libonnxruntime_providers_tensorrt.so" | grep 'not found'
    lscpu | grep 'Model name'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# The provider test, whose expectations follow what the loaded library reports.
step provider-test "$EFFIR_TEST_BIN" --exact execution_providers_fall_back_or_fail_strictly_when_unavailable --nocapture --test-threads 1

# Embeddings under the CUDA provider (strict: no silent CPU fallback), for
# parity with the CPU; then the same request with TensorRT first, which
# falls back when its libraries are absent.
for g in minilm-fp32-w16 minilm-fp16 minilm-qdq; do
    step "encode-queries-$g" $EFFIR encode --onnx --model "$GRAPHS/$g" --providers "$PROVIDER" --strict-providers \
        --data "$TEXTS" --shard 0/1 --out "$OUT/queries-$g" --quiet
    step "encode-docs-$g" $EFFIR encode --onnx --model "$GRAPHS/$g" --providers "$PROVIDER" --strict-providers \
        --data "$DOCS" --shard 0/1 --out "$OUT/docs-$g" --quiet
    for d in $EVAL_DATA; do
        step "eval-$(basename "$d")-$g" $EFFIR eval --onnx --model "$GRAPHS/$g" --providers "$PROVIDER" --strict-providers \
            --data "$d" --no-cache --quiet --out "$OUT/eval-$(basename "$d")-$g"
    done
done
step tensorrt-fallback $EFFIR eval --onnx --model "$GRAPHS/minilm-qdq" --providers tensorrt,cuda,cpu \
    --data "$DOCS" --no-cache --out "$OUT/eval-qdq-trt-fallback"
step tensorrt-strict $EFFIR eval --onnx --model "$GRAPHS/minilm-qdq" --providers tensorrt --strict-providers \
    --data "$DOCS" --no-cache --quiet --out "$OUT/eval-qdq-trt-strict"

# Speed on the GPU, the three graphs interleaved in one run (host-to-device
# copies of inputs and outputs included, as a serving stack without I/O
# binding sees them).
step bench $EFFIR bench --providers "$PROVIDER" --strict-providers \
    --graph "$GRAPHS/minilm-fp32-w16" --graph "$GRAPHS/minilm-fp16" --graph "$GRAPHS/minilm-qdq" \
    --batch 1,32,128 --length 32,256 --runs 50 --warmup 10 --out "$OUT/bench.json"

printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
