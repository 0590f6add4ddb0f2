#!/usr/bin/env bash
# Installs ONNX Runtime for effir: the `onnxruntime` PyPI wheel (its CPU
# library, and the Python client the tests use as an independent reader of
# exported graphs), `onnx` (checker and shape inference), `safetensors` and
# `tokenizers` (the client's reference files and tokenizer), then links the
# library where effir looks by default:
#   ${XDG_DATA_HOME:-~/.local/share}/effir/onnxruntime/libonnxruntime.so
# ORT_DYLIB_PATH overrides that location at run time. For GPUs, install
# `onnxruntime-gpu` instead and point ORT_DYLIB_PATH at its library.
set -euo pipefail
PYTHON=${PYTHON:-python3}
ORT_VERSION=${ORT_VERSION:-1.32.0}
ONNX_VERSION=${ONNX_VERSION:-1.23.2}
# safetensors, tokenizers: the test suite's Python ONNX client (tests/onnx_client.py);
# tritonclient[grpc]: Triton's model_config.proto, compiled, for tests/triton_config_check.py.
have=$($PYTHON -c "import onnxruntime, onnx, safetensors, tokenizers; from tritonclient.grpc import model_config_pb2; print(onnxruntime.__version__)" 2>/dev/null || true)
if [ "$have" != "$ORT_VERSION" ]; then
  echo "installing onnxruntime==$ORT_VERSION onnx==$ONNX_VERSION safetensors tokenizers tritonclient[grpc]" >&2
  $PYTHON -m pip install -q "onnxruntime==$ORT_VERSION" "onnx==$ONNX_VERSION" safetensors tokenizers numpy "tritonclient[grpc]"
fi
capi=$($PYTHON -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))")
lib=$(ls "$capi"/libonnxruntime.so.* | head -1)
dest="${XDG_DATA_HOME:-$HOME/.local/share}/effir/onnxruntime"
mkdir -p "$dest"
ln -sf "$lib" "$dest/libonnxruntime.so"
echo "ONNX Runtime $ORT_VERSION: $dest/libonnxruntime.so -> $lib" >&2
