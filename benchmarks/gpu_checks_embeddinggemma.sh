#!/usr/bin/env bash
# EmbeddingGemma-300M's fp16 graph under the CUDA provider (issue #13), on a
# GPU machine that takes a small payload per call.
#
#   benchmarks/gpu_checks_embeddinggemma.sh ORT_LIB_DIR GRAPH_DIR TEXTS_DIR OUT_DIR
#
# GRAPH_DIR: `effir export --precision fp16` of EmbeddingGemma with the rows
# of its token-embedding table that TEXTS_DIR's texts never use zeroed
# (benchmarks/zero_unused_embedding_rows.py): the same graph on those texts,
# a fifth of the size once compressed. TEXTS_DIR: a BEIR folder whose corpus
# is the texts (64 SciFact and 64 Cranfield abstracts). Writes the texts'
# embeddings under strict CUDA (for benchmarks/gpu_parity.py-style comparison
# with the CPU float32 export) and the graph's speed.
set -u
LIB=$1 GRAPH=$2 TEXTS=$3 OUT=$4
mkdir -p "$OUT"
# shellcheck source=benchmarks/gpu_onnxruntime_env.sh
. "$(dirname "$0")/gpu_onnxruntime_env.sh"
EFFIR=target/release/effir
nvidia-smi --query-gpu=name,driver_version --format=csv >"$OUT/machine.txt" 2>&1
$EFFIR encode --onnx --model "$GRAPH" --providers cuda --strict-providers --data "$TEXTS" --shard 0/1 \
    --max-length 256 --out "$OUT/texts-fp16-cuda" --quiet >"$OUT/encode.log" 2>&1
echo "encode: exit $?" | tee -a "$OUT/summary.txt"
$EFFIR bench --providers cuda --strict-providers --graph "$GRAPH" --batch 1,8,32 --length 32,256 \
    --runs 30 --warmup 5 --out "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench: exit $?" | tee -a "$OUT/summary.txt"
tail -n 8 "$OUT/bench.log"
