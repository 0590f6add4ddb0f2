#!/usr/bin/env python3
"""One BERT attention block (the scores, the padding mask, softmax, the
product by V) in three ONNX forms, timed in ONNX Runtime on the CPU:

- `added`: MatMul(q, kᵀ) scaled, the mask bias of each key added to the
  `(B, H, T, T)` scores, Softmax, MatMul by V (Optimum's and effir's
  `--attention-mask added` form);
- `folded`: the bias joined to the keys, `[q, 1]·[k, b]ᵀ`, so the scores
  leave the product with the mask in them (effir's default BERT form);
- `attention-op`: the standard opset-23 `Attention` operator.

Each with every key attended, and with padding (random lengths 32..T, the
masked keys' bias f32::MIN as effir writes it). Shapes as MiniLM at batch
32 × 256; medians of interleaved runs.

    runs/venv-optimum/bin/python benchmarks/attention_forms.py [--runs 7] [--mask-value V]

`--mask-value` replaces f32::MIN as the masked keys' bias.
"""

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

B, H, S, D = 32, 12, 256, 32
E = H * D
MASKED = np.finfo(np.float32).min


def heads(nodes, name, perm):
    nodes.append(h.make_node("Reshape", [name, "shape4"], [name + "4"]))
    nodes.append(h.make_node("Transpose", [name + "4"], [name + "t"], perm=perm))
    return name + "t"


def graph(form):
    inits = [
        h.make_tensor("shape4", T.INT64, [4], [B, S, H, D]),
        h.make_tensor("shape3", T.INT64, [3], [B, S, E]),
        h.make_tensor("scale", T.FLOAT, [], [1 / np.sqrt(D)]),
    ]
    nodes = []
    if form == "attention-op":
        # The operator wants the mask's query axis spelled out.
        inits = [h.make_tensor("mshape", T.INT64, [4], [B, 1, S, S])]
        nodes = [
            h.make_node("Expand", ["mask", "mshape"], ["m2"]),
            h.make_node("Attention", ["q", "k", "v", "m2"], ["out"], q_num_heads=H, kv_num_heads=H),
        ]
    else:
        q = heads(nodes, "q", [0, 2, 1, 3])
        v = heads(nodes, "v", [0, 2, 1, 3])
        if form == "added":
            k = heads(nodes, "k", [0, 2, 3, 1])
            nodes += [
                h.make_node("MatMul", [q, k], ["s0"]),
                h.make_node("Mul", ["s0", "scale"], ["s1"]),
                h.make_node("Add", ["s1", "mask"], ["s"]),
            ]
        else:
            # [q·scale, 1] · [k, b]ᵀ: the bias of key j is the last column.
            k = heads(nodes, "k", [0, 2, 1, 3])
            inits += [
                h.make_tensor("ones_shape", T.INT64, [4], [B, H, S, 1]),
                h.make_tensor("bias_shape", T.INT64, [4], [B, H, S, 1]),
                h.make_tensor("one", T.FLOAT, [], [1.0]),
                h.make_tensor("to_keys", T.INT64, [4], [B, 1, S, 1]),
            ]
            nodes += [
                h.make_node("Mul", [q, "scale"], ["qs"]),
                h.make_node("Expand", ["one", "ones_shape"], ["ones"]),
                h.make_node("Concat", ["qs", "ones"], ["q1"], axis=-1),
                h.make_node("Reshape", ["mask", "to_keys"], ["mk"]),
                h.make_node("Expand", ["mk", "bias_shape"], ["bk"]),
                h.make_node("Concat", [k, "bk"], ["kb"], axis=-1),
                h.make_node("Transpose", ["kb"], ["kbt"], perm=[0, 1, 3, 2]),
                h.make_node("MatMul", ["q1", "kbt"], ["s"]),
            ]
        nodes += [
            h.make_node("Softmax", ["s"], ["p"], axis=-1),
            h.make_node("MatMul", ["p", v], ["o4"]),
            h.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
            h.make_node("Reshape", ["ot", "shape3"], ["out"]),
        ]
    inputs = [h.make_tensor_value_info(n, T.FLOAT, [B, S, E]) for n in "qkv"]
    inputs.append(h.make_tensor_value_info("mask", T.FLOAT, [B, 1, 1, S]))
    g = h.make_graph(nodes, form, inputs, [h.make_tensor_value_info("out", T.FLOAT, [B, S, E])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 23)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m.SerializeToString()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mask-value", type=float, default=float(MASKED))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, S, E), dtype=np.float32) for _ in range(3))
    lengths = rng.integers(32, S + 1, B)
    masks = {"all attended": np.zeros((B, 1, 1, S), np.float32)}
    padded = np.zeros((B, 1, 1, S), np.float32)
    for b, n in enumerate(lengths):
        padded[b, ..., n:] = args.mask_value
    masks[f"padded (mean length {lengths.mean():.0f}, bias {args.mask_value:g})"] = padded
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    forms = ["added", "folded", "attention-op"]
    sessions = {f: ort.InferenceSession(graph(f), so, providers=["CPUExecutionProvider"]) for f in forms}
    for mname, mask in masks.items():
        feed = {"q": q, "k": k, "v": v, "mask": mask}
        outs = {f: s.run(None, feed)[0] for f, s in sessions.items()}
        for f in forms[1:]:
            diff = np.abs(outs[f] - outs["added"]).max()
            assert diff < 1e-4, f"{f} differs from added by {diff} ({mname})"
    times = {(f, m): [] for f in forms for m in masks}
    import time

    for _ in range(args.runs):
        for mname, mask in masks.items():
            feed = {"q": q, "k": k, "v": v, "mask": mask}
            for f, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[(f, mname)].append(time.perf_counter() - t)
    print(f"ONNX Runtime {ort.__version__}, one attention block at {B} × {H} heads × {S} × {D}, "
          f"{args.threads} threads, median of {args.runs} interleaved runs\n")
    print("| form | " + " | ".join(masks) + " |")
    print("|---|" + "---:|" * len(masks))
    for f in forms:
        cells = [f"{1000 * np.median(times[(f, m)]):.1f} ms" for m in masks]
        print(f"| {f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
