#!/usr/bin/env python3
"""An independent client of effir's ONNX exports: Python `onnx` checks the
graph, Python `onnxruntime` runs it, and its embeddings are compared with
reference embeddings made by transformers / sentence-transformers
(tests/fixtures/*/reference.safetensors). effir's own code is not involved.

  onnx_client.py --export DIR --reference DIR/reference.safetensors \
                 --texts DIR/reference.json [--min-cosine 0.99999]
  onnx_client.py --export DIR --check-only

When the reference holds `input_ids` and `attention_mask` (tiny fixtures),
they are fed as they are and `last_hidden_state` is compared too; otherwise
the texts are tokenized with the export's tokenizer.json, as a serving
client would. Prints one JSON line; exits 1 below the threshold.
"""

import argparse
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file


def check_graph(path):
    """ONNX checker (full) and strict shape inference, by path so that
    external data is found."""
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path, load_external_data=False)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model


def find_graph(export):
    for candidate in ("model.onnx", os.path.join("onnx", "model.onnx")):
        path = os.path.join(export, candidate)
        if os.path.isfile(path):
            return path
    sys.exit(f"{export}: no model.onnx or onnx/model.onnx")


def tokenize(export, texts, prompt_prefix):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(export, "tokenizer.json"))
    max_len = 512
    cfg = os.path.join(export, "sentence_bert_config.json")
    if os.path.isfile(cfg):
        max_len = json.load(open(cfg)).get("max_seq_length", max_len)
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding()
    enc = tok.encode_batch([prompt_prefix + t for t in texts])
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask


def pool(hidden, mask, export):
    """Pooling and Normalize as the export's sentence-transformers files say."""
    mode = "mean"
    cfg = os.path.join(export, "1_Pooling", "config.json")
    if os.path.isfile(cfg):
        c = json.load(open(cfg))
        if c.get("pooling_mode_cls_token"):
            mode = "cls"
        elif c.get("pooling_mode_lasttoken"):
            mode = "last"
    m = mask[..., None].astype(np.float32)
    if mode == "cls":
        x = hidden[:, 0]
    elif mode == "last":
        last = (mask * np.arange(1, mask.shape[1] + 1)).argmax(1)
        x = hidden[np.arange(hidden.shape[0]), last]
    else:
        x = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    modules = os.path.join(export, "modules.json")
    if os.path.isfile(modules) and any(
        "Normalize" in mod.get("type", "") for mod in json.load(open(modules))
    ):
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def cosines(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--export", required=True)
    p.add_argument("--reference")
    p.add_argument("--texts")
    p.add_argument("--check-only", action="store_true", help="only the ONNX checker and shape inference")
    p.add_argument("--min-cosine", type=float, default=0.99999)
    args = p.parse_args()

    graph = find_graph(args.export)
    model = check_graph(graph)
    if args.check_only:
        print(json.dumps({"graph": graph, "checked": True}))
        return
    if not (args.reference and args.texts):
        sys.exit("--reference and --texts are required unless --check-only")
    ref = load_file(args.reference)
    meta = json.load(open(args.texts))
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    if "input_ids" in ref:
        ids = ref["input_ids"].astype(np.int64)
        mask = ref["attention_mask"].astype(np.int64)
    else:
        ids, mask = tokenize(args.export, meta["texts"], "")
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    result = dict(zip(outputs, session.run(outputs, feeds)))

    report = {"graph": graph, "opset": model.opset_import[0].version, "outputs": outputs}
    worst = 1.0
    # An Optimum-profile graph stops at last_hidden_state; its client pools.
    # With a hidden-state reference that is what is compared; otherwise the
    # client pools as the sentence-transformers files say (no Dense modules).
    if "sentence_embedding" in result or "last_hidden_state" not in ref:
        if "sentence_embedding" in result:
            emb = result["sentence_embedding"]
        else:
            emb = pool(result["last_hidden_state"], mask, args.export)
        cos = cosines(emb, ref["embedding"])
        report["embedding_min_cosine"] = float(cos.min())
        report["embedding_max_abs_diff"] = float(np.abs(emb - ref["embedding"]).max())
        worst = cos.min()
    if "last_hidden_state" in ref:
        keep = mask.astype(bool)
        hc = cosines(result["last_hidden_state"][keep], ref["last_hidden_state"][keep])
        report["hidden_min_cosine"] = float(hc.min())
        worst = min(worst, hc.min())
    report["passed"] = bool(worst >= args.min_cosine)
    print(json.dumps(report))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
