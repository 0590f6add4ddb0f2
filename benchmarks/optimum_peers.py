#!/usr/bin/env python3
"""The peers a user gets from Optimum with one command each, as serving
directories `effir frontier --peer` can score: Optimum's fp32 ONNX export
of a sentence-transformers model, and its dynamic int8 quantization with
the two presets the issue compares (`AutoQuantizationConfig.avx2`: uint8
activations and weights, per channel; `avx512_vnni`: uint8 activations,
int8 weights, per channel, the preset sentence-transformers'
`export_dynamic_quantized_onnx_model` recommends).

    runs/venv-optimum/bin/python benchmarks/optimum_peers.py --model models/all-MiniLM-L6-v2 --out runs/frontier/peers

Run it in the Makefile's Optimum venv (optimum-onnx pins transformers <
4.58). Writes OUT/optimum-fp32, OUT/optimum-int8-avx2 and
OUT/optimum-int8-avx512-vnni, each with model.onnx beside a copy of the
model's tokenizer and sentence-transformers files.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.txt", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json"]


def serving_dir(model: Path, graph: Path, dest: Path):
    """`graph` as DEST/model.onnx beside the model's files; written in a
    temporary directory first, so DEST appears whole or not at all."""
    stage = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    for name in MODEL_FILES:
        if (model / name).exists():
            shutil.copy(model / name, stage / name)
    for sub in model.iterdir():
        if sub.is_dir() and sub.name[:1].isdigit():  # 1_Pooling, 2_Normalize, ...
            shutil.copytree(sub, stage / sub.name)
    shutil.copy(graph, stage / "model.onnx")
    if dest.exists():
        shutil.rmtree(dest)
    stage.rename(dest)
    print(f"wrote {dest}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "fp32"
        cli = Path(sys.executable).with_name("optimum-cli")
        subprocess.run([str(cli) if cli.exists() else "optimum-cli", "export", "onnx", "--model", str(model),
                        "--task", "feature-extraction", "--opset", "17", str(export)], check=True)
        serving_dir(model, export / "model.onnx", out / "optimum-fp32")
        for name, config in [
            ("optimum-int8-avx2", AutoQuantizationConfig.avx2(is_static=False, per_channel=True)),
            ("optimum-int8-avx512-vnni", AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)),
        ]:
            quantized = Path(tmp) / name
            ORTQuantizer.from_pretrained(export, file_name="model.onnx").quantize(
                save_dir=quantized, quantization_config=config)
            serving_dir(model, quantized / "model_quantized.onnx", out / name)


if __name__ == "__main__":
    main()
