#!/usr/bin/env bash
# Prepares benchmarks/gpu_checks.sh for a GPU machine that can download
# nothing and takes a limited payload per call (64 MiB here, the working tree
# included), and makes the CPU references benchmarks/gpu_parity.py compares
# the GPU's embeddings with.
#
#   benchmarks/gpu_checks_prep.sh [WORK [CHUNK_BYTES]]
#
# Writes into the repository's .gpu/c1 .. .gpu/cN (add `/.gpu/` to
# .git/info/exclude): each is one call's carry. On the GPU machine, calls 1 ..
# N-1 run `mkdir -p /tmp/gpu && cp .gpu/cK/* /tmp/gpu/` (carry .gpu/cK), and
# call N runs benchmarks/gpu_checks_device.sh (carry .gpu/cN), which
# assembles the payload and runs the checks. Then, here:
#   tar xzf gpu-logs.tgz -C R; tar xzf gpu-embeddings.tgz -C R
#   python3 benchmarks/gpu_parity.py R WORK/ref > parity.json
#
# What travels:
# - onnxruntime-gpu's libraries (ORT_GPU, a CUDA 13 build by default; the
#   machine's PyTorch brings CUDA, cuBLAS, cuFFT, cuRAND and cuDNN). The CUDA
#   provider's device code for GPUs other than SM (default 90: H100/H200) is
#   zeroed (benchmarks/prune_fatbin.py), so it compresses to a fifth;
# - effir and the test binary of tests/test_onnx_export.rs, built here;
# - three MiniLM exports (fp32 arithmetic with float16 storage, --precision
#   fp16, QDQ int8). The float32 word-embedding table the fp16 and QDQ graphs
#   share travels once (benchmarks/graph_table_splice.py);
# - SciFact's and Cranfield's queries as a BEIR corpus (texts to embed).
set -euo pipefail
WORK=${1:-runs/gpu-prep}
CHUNK=${2:-48500000}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
SM=${SM:-90}
EFFIR=target/release/effir
MINILM=${MINILM:-models/all-MiniLM-L6-v2}
DATA=data/scifact
rm -rf "$WORK" .gpu
mkdir -p "$WORK"/{A/lib,A/bin,B/lib,B/graphs,ref,wheel} .gpu

# 1. ONNX Runtime with the CUDA and TensorRT providers.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$WORK/wheel" "$ORT_GPU"
unzip -q -o "$WORK"/wheel/onnxruntime_gpu-*.whl 'onnxruntime/capi/*.so*' -d "$WORK/wheel"
capi=$WORK/wheel/onnxruntime/capi
cp "$capi"/libonnxruntime.so.* "$WORK/A/lib/libonnxruntime.so"
cp "$capi/libonnxruntime_providers_shared.so" "$capi/libonnxruntime_providers_tensorrt.so" "$WORK/A/lib/"
python3 benchmarks/prune_fatbin.py "$capi/libonnxruntime_providers_cuda.so" \
    "$WORK/B/lib/libonnxruntime_providers_cuda.so" "$SM"

# 2. The binaries (stripped).
cargo build --release
test_bin=$(cargo test --release --test test_onnx_export --no-run 2>&1 |
    grep -o 'target/release/deps/test_onnx_export-[0-9a-f]*' | head -1)
cp "$EFFIR" "$WORK/A/bin/effir"
cp "$test_bin" "$WORK/A/bin/test_onnx_export"
strip "$WORK"/A/bin/*
cp benchmarks/graph_table_splice.py "$WORK/A/"

# 3. The graphs, and the float32 export every parity figure is measured against.
$EFFIR export --model "$MINILM" --profile sentence-transformers --fp16 --out "$WORK/B/graphs/minilm-fp32-w16"
$EFFIR export --model "$MINILM" --profile sentence-transformers --precision fp16 --calib-data $DATA \
    --out "$WORK/B/graphs/minilm-fp16"
$EFFIR export --model "$MINILM" --profile sentence-transformers --target tensorrt --precision int8 \
    --calib-data $DATA --out "$WORK/B/graphs/minilm-qdq"
$EFFIR export --model "$MINILM" --profile sentence-transformers --out "$WORK/minilm-fp32"

# 4. The queries of both datasets as one corpus (encode embeds a corpus).
python3 - "$WORK/A/qtexts" <<'EOF'
import gzip, json, os, sys
out = sys.argv[1]
os.makedirs(f"{out}/qrels", exist_ok=True)
rows = []
for ds in ["scifact", "cranfield"]:
    for line in gzip.open(f"data/{ds}/queries.jsonl.gz", "rt"):
        q = json.loads(line)
        rows.append({"_id": f"{ds}-{q['_id']}", "title": "", "text": q["text"]})
with open(f"{out}/corpus.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
with open(f"{out}/queries.jsonl", "w") as f:
    f.write(json.dumps({"_id": "q0", "text": rows[0]["text"]}) + "\n")
with open(f"{out}/qrels/test.tsv", "w") as f:
    f.write(f"query-id\tcorpus-id\tscore\nq0\t{rows[0]['_id']}\t1\n")
EOF

# 5. CPU references: the float32 export, and each travelling graph on the CPU.
for g in fp32 minilm-fp16 minilm-qdq; do
    graph=$WORK/B/graphs/$g suffix=-cpu
    [ $g = fp32 ] && graph=$WORK/minilm-fp32 suffix=
    $EFFIR encode --onnx --model "$graph" --data "$WORK/A/qtexts" --shard 0/1 --out "$WORK/ref/queries-$g$suffix" --quiet
    $EFFIR encode --onnx --model "$graph" --data data/cranfield --shard 0/1 --out "$WORK/ref/docs-$g$suffix" --quiet
done

# 6. Pack and cut into carries: c1 = A + the head of B, then B in CHUNK pieces.
python3 benchmarks/graph_table_splice.py out "$MINILM/model.safetensors" "$WORK/B/table.bin" \
    "$WORK/B/graphs/minilm-fp16/model.onnx" "$WORK/B/graphs/minilm-qdq/model.onnx"
tar cf - -C "$WORK/A" . | xz -6 -T0 >"$WORK/A.tar.xz"
tar cf - -C "$WORK/B" . | xz -6 -T0 >"$WORK/B.tar.xz"
a=$(stat -c %s "$WORK/A.tar.xz")
mkdir -p .gpu/c1
cp "$WORK/A.tar.xz" .gpu/c1/
head -c $((CHUNK - a)) "$WORK/B.tar.xz" >.gpu/c1/B.part1
tail -c +$((CHUNK - a + 1)) "$WORK/B.tar.xz" | split -b "$CHUNK" -d -a 1 --numeric-suffixes=2 - "$WORK/B.part"
for p in "$WORK"/B.part*; do
    n=${p##*B.part}
    mkdir -p ".gpu/c$n"
    mv "$p" ".gpu/c$n/B.part$n"
done
ls -l .gpu/*/
