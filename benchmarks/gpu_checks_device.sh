#!/usr/bin/env bash
# The last call on the GPU machine: assemble what benchmarks/gpu_checks_prep.sh
# sent in /tmp/gpu (this call's carry, .gpu/cN, included), run
# benchmarks/gpu_checks.sh, and pack the results into $OUT.
set -u
cp .gpu/c*/* /tmp/gpu/ 2>/dev/null
repo=$PWD
cd /tmp/gpu || exit 1
mkdir -p A B
tar xJf A.tar.xz -C A || exit 1
# shellcheck disable=SC2046 # the parts, in order
cat $(ls B.part* | sort -V) | tar xJf - -C B || exit 1
cp B/lib/* A/lib/
python3 A/graph_table_splice.py in B/table.bin B/graphs/minilm-fp16/model.onnx B/graphs/minilm-qdq/model.onnx || exit 1
cd "$repo" || exit 1
# The test binary knows the repository and effir by the paths they had where
# it was built (/work/main here).
mkdir -p target/release
cp /tmp/gpu/A/bin/effir target/release/
[ "$PWD" = /work/main ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
EFFIR_TEST_BIN=/tmp/gpu/A/bin/test_onnx_export bash benchmarks/gpu_checks.sh \
    /tmp/gpu/A/lib /tmp/gpu/B/graphs /tmp/gpu/A/qtexts /tmp/gpuout
cd /tmp/gpuout || exit 1
tar czf "$OUT/gpu-logs.tgz" --exclude='*.npy' --exclude=run.trec .
# shellcheck disable=SC2046
tar czf "$OUT/gpu-embeddings.tgz" $(find . -name '*.npy' -o -name ids.txt)
