#!/usr/bin/env python3
"""Checks a Triton model directory written by `effir export --layout triton`
with Triton's own model configuration schema: `config.pbtxt` is parsed as a
`ModelConfig` (tritonclient's compiled model_config.proto, protobuf text
format; anything the schema does not know is an error), and its inputs and
outputs are compared with the ONNX graph in `1/model.onnx` (names, types,
dims without the batch axis).

  triton_config_check.py MODEL_DIR [--accelerator tensorrt --precision INT8]

Prints one JSON line; exits 1 on any mismatch.
"""

import argparse
import json
import os
import sys

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.FLOAT16: model_config_pb2.TYPE_FP16,
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
    onnx.TensorProto.BOOL: model_config_pb2.TYPE_BOOL,
}


def fail(message):
    print(json.dumps({"passed": False, "error": message}))
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--accelerator")
    parser.add_argument("--precision")
    args = parser.parse_args()

    path = os.path.join(args.model_dir, "config.pbtxt")
    try:
        config = text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        fail(f"{path}: {e}")
    name = os.path.basename(os.path.normpath(args.model_dir))
    if config.name != name:
        fail(f"name {config.name!r}, directory {name!r}")
    if config.platform != "onnxruntime_onnx":
        fail(f"platform {config.platform!r}")
    if config.max_batch_size < 1:
        fail("max_batch_size must be positive (the batch axis is Triton's)")
    if not config.HasField("dynamic_batching"):
        fail("no dynamic_batching")
    if len(config.instance_group) != 1:
        fail("one instance group expected")

    graph = onnx.load(os.path.join(args.model_dir, "1", "model.onnx"), load_external_data=False)
    initializers = {t.name for t in graph.graph.initializer}

    def described(values):
        out = {}
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out[v.name] = (ONNX_TO_TRITON[t.elem_type], dims[1:])
        return out

    for kind, declared, actual in (
        ("input", config.input, described(graph.graph.input)),
        ("output", config.output, described(graph.graph.output)),
    ):
        got = {t.name: (t.data_type, list(t.dims)) for t in declared}
        if got != actual:
            fail(f"{kind}s: config.pbtxt {got}, graph {actual}")

    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if args.accelerator:
        if [a.name for a in accelerators] != [args.accelerator]:
            fail(f"accelerators {[a.name for a in accelerators]}")
        if config.instance_group[0].kind != model_config_pb2.ModelInstanceGroup.KIND_GPU:
            fail("an accelerated model runs on the GPU")
        precision = accelerators[0].parameters.get("precision_mode")
        if precision != args.precision:
            fail(f"precision_mode {precision!r}, expected {args.precision!r}")
    elif accelerators:
        fail(f"unexpected accelerators {[a.name for a in accelerators]}")
    print(json.dumps({"passed": True, "name": config.name, "inputs": len(config.input), "outputs": len(config.output)}))


if __name__ == "__main__":
    main()
