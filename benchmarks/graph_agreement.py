#!/usr/bin/env python3
"""How closely two exported graphs agree: the cosine of their
`sentence_embedding` outputs on the first N SciFact abstracts (Python ONNX
Runtime, CPU, 2 threads, one batch, max length 256), each text behind an
optional prefix (a model's document prompt).

    runs/venv-fastembed/bin/python benchmarks/graph_agreement.py A_DIR B_DIR [--texts 16] [--prefix "title: none | text: "]

Used to check that two int8 graphs of one model (smoothed with a `Mul`, or
with the division folded upstream) are as close to the float graph as each
other (RESULTS.md, "Smoothed int8").
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_sample import scifact_documents  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--prefix", default="")
    args = ap.parse_args()
    tok = Tokenizer.from_file(str(Path(args.a) / "tokenizer.json"))
    texts = [args.prefix + t for t in scifact_documents(args.texts)]
    enc = tok.encode_batch(texts)
    length = min(256, max(len(e.ids) for e in enc))
    ids = np.array([(e.ids + [0] * length)[:length] for e in enc], dtype=np.int64)
    mask = np.array([(e.attention_mask + [0] * length)[:length] for e in enc], dtype=np.int64)
    outputs = []
    for d in (args.a, args.b):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(Path(d) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids, "attention_mask": mask}
        if any(i.name == "token_type_ids" for i in session.get_inputs()):
            feeds["token_type_ids"] = np.zeros_like(ids)
        outputs.append(session.run(["sentence_embedding"], feeds)[0])
    x, y = outputs
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    print(f"{len(texts)} texts, lowest cosine {cos.min():.7f}, mean {cos.mean():.7f}")


if __name__ == "__main__":
    main()
