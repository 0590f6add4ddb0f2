#!/usr/bin/env bash
# Installs the Debian packages effir's build and model fetching need, when
# missing: unzip (model wheels), protobuf-compiler (candle-onnx's build).
set -euo pipefail
missing=()
command -v unzip >/dev/null || missing+=(unzip)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "installing: ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
