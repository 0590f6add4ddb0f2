#!/usr/bin/env python3
"""Two rejected variants of effir's int8 graph, measured against its fp32
graph in Python ONNX Runtime (2 threads) on the first 96 SciFact abstracts:
parity (cosine of mean-pooled embeddings) and the median time of a batch of
32 (5 interleaved rounds).

    python3 benchmarks/int8_experiments.py --fp32 runs/onnx/minilm-fp32 --int8 runs/onnx/minilm-int8-u8s8

- per-token: every DynamicQuantizeLinear replaced by per-row symmetric
  uint8 (zero point 128, scale = max|x| / 127) from standard operators;
- attention: the activation x activation MatMuls (q kᵀ, P v) quantized too,
  DynamicQuantizeLinear on both inputs, MatMulInteger, scale.

Both graphs are `effir export --precision int8` rewrites, kept out of effir
(RESULTS.md, "The speed/quality frontier").
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_sample import scifact_documents  # noqa: E402


def per_token(model):
    g = model.graph
    consts = {"pt_eps": 1e-12, "pt_127": 127.0, "pt_128": 128.0, "pt_zero": 0.0, "pt_255": 255.0}
    g.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.float32), k) for k, v in consts.items())
    g.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), "pt_zp"))
    nodes = []
    for n in g.node:
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        x, (q, s, zp), p = n.input[0], n.output, n.input[0] + "_pt"
        nodes += [
            helper.make_node("Abs", [x], [p + "_abs"]),
            helper.make_node("ReduceMax", [p + "_abs"], [p + "_max"], keepdims=1, axes=[-1]),
            helper.make_node("Max", [p + "_max", "pt_eps"], [p + "_maxc"]),
            helper.make_node("Div", [p + "_maxc", "pt_127"], [s]),
            helper.make_node("Div", [x, s], [p + "_scaled"]),
            helper.make_node("Round", [p + "_scaled"], [p + "_round"]),
            helper.make_node("Add", [p + "_round", "pt_128"], [p + "_shift"]),
            helper.make_node("Clip", [p + "_shift", "pt_zero", "pt_255"], [p + "_clip"]),
            helper.make_node("Cast", [p + "_clip"], [q], to=TensorProto.UINT8),
            helper.make_node("Identity", ["pt_zp"], [zp]),
        ]
    del g.node[:]
    g.node.extend(nodes)


def attention(model):
    g = model.graph
    weights = {i.name for i in g.initializer}
    nodes = []
    for k, n in enumerate(g.node):
        if n.op_type != "MatMul" or any(i in weights for i in n.input):
            nodes.append(n)
            continue
        (a, b), y, p = n.input, n.output[0], f"aq{k}"
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [a], [p + "a", p + "as", p + "az"]),
            helper.make_node("DynamicQuantizeLinear", [b], [p + "b", p + "bs", p + "bz"]),
            helper.make_node("MatMulInteger", [p + "a", p + "b", p + "az", p + "bz"], [p + "i"]),
            helper.make_node("Cast", [p + "i"], [p + "f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [p + "as", p + "bs"], [p + "s"]),
            helper.make_node("Mul", [p + "f", p + "s"], [y]),
        ]
    del g.node[:]
    g.node.extend(nodes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True, help="effir export directory, fp32")
    ap.add_argument("--int8", required=True, help="effir export directory, --precision int8")
    args = ap.parse_args()
    tok = Tokenizer.from_file(str(Path(args.int8) / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.enable_padding()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    graphs = {"fp32": str(Path(args.fp32) / "model.onnx"), "int8": str(Path(args.int8) / "model.onnx")}
    tmp = tempfile.mkdtemp()
    for name, rewrite in [("int8 per-token", per_token), ("int8 + attention", attention)]:
        model = onnx.load(graphs["int8"])
        rewrite(model)
        graphs[name] = f"{tmp}/{name.replace(' ', '_')}.onnx"
        onnx.save(model, graphs[name])
    sessions = {n: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for n, p in graphs.items()}

    def embed(session, texts):
        enc = tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        names = {i.name for i in session.get_inputs()}
        out = session.run(None, {k: v for k, v in feed.items() if k in names})[0]
        pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    docs = scifact_documents(96)
    ref = np.concatenate([embed(sessions["fp32"], docs[i:i + 32]) for i in range(0, 96, 32)])
    times = {n: [] for n in sessions}
    for _ in range(5):
        for n, s in sessions.items():
            start = time.perf_counter()
            embed(s, docs[:32])
            times[n].append(time.perf_counter() - start)
    base = np.median(times["fp32"])
    for n, s in sessions.items():
        e = np.concatenate([embed(s, docs[i:i + 32]) for i in range(0, 96, 32)])
        cos = (e * ref).sum(1)
        print(f"{n:18s} min cos {cos.min():.5f}  mean {cos.mean():.6f}  "
              f"{np.median(times[n]):.3f} s/batch  {base / np.median(times[n]):.2f}x fp32")


if __name__ == "__main__":
    main()
