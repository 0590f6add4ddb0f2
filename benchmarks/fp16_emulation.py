#!/usr/bin/env python3
"""What `effir export --precision fp16` computes, emulated in PyTorch on the
CPU, against the float32 model: every projection of the transformer layers
(attention Q/K/V/output, MLP gate/up/down) multiplies a float16-rounded
input by float16 weights and rounds its product to float16; the bias, norms,
softmax, activations and the residual stream stay float32, as in the
exported graph. This is the arithmetic a GPU runs (float16 GEMM with float32
accumulation). ONNX Runtime's CPU provider cannot show it: on x86 it has no
float16 MatMul and runs the products in float32 after removing the casts,
so `effir validate` on the CPU measures the float16 weights alone.

  fp16_emulation.py --model models/all-MiniLM-L6-v2 --data data/scifact [--texts 256]

Texts: queries (with the model's query prompt) and documents (with its
document prompt), spread over the dataset as `effir validate` picks them.
Prints one JSON line: lowest and mean cosine, largest value any projection
saw, and whether anything was NaN or Inf.
"""

import argparse
import gzip
import json
import os

import torch
from sentence_transformers import SentenceTransformer


def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def find(data, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(data, candidate)
        if os.path.isfile(path):
            return path
    raise SystemExit(f"{data}: no {name}")


def spread(items, count):
    count = min(count, len(items))
    return [items[i * len(items) // count] for i in range(count)]


class Float16Product(torch.nn.Module):
    """`x W^T` in float16 (inputs, weights and product rounded), `+ b` in float32."""

    def __init__(self, linear, peak):
        super().__init__()
        self.weight = linear.weight.detach().half()
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.peak = peak

    def forward(self, x):
        y = torch.nn.functional.linear(x.half(), self.weight).float()
        self.peak[0] = max(self.peak[0], x.abs().max().item(), y.abs().max().item())
        return y if self.bias is None else y + self.bias


def emulate_float16(model, peak):
    """Swaps every nn.Linear under the transformer's layers (not the Dense head)."""
    backbone = model[0].auto_model
    count = 0
    for name, module in list(backbone.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and (".layer." in f".{full}" or "layers." in full):
                setattr(module, child_name, Float16Product(child, peak))
                count += 1
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    queries = [q["text"] for q in read_jsonl(find(args.data, "queries.jsonl"))]
    docs = [
        (d.get("title", "") + " " + d["text"]).strip()
        for d in read_jsonl(find(args.data, "corpus.jsonl"))
    ]
    torch.manual_seed(0)
    reference = SentenceTransformer(args.model, device="cpu")
    reference.max_seq_length = args.max_length
    # sentence-transformers >= 5 reports empty prompts for every model: read
    # the model's own file.
    config = os.path.join(args.model, "config_sentence_transformers.json")
    prompts = json.load(open(config)).get("prompts") or {} if os.path.isfile(config) else {}
    prompts = {k: v for k, v in prompts.items() if v}
    q_prompt = prompts.get("query", "")
    d_prompt = prompts.get("document", "")
    texts = [q_prompt + q for q in spread(queries, args.texts // 2)]
    texts += [d_prompt + d for d in spread(docs, args.texts - args.texts // 2)]

    def encode(model):
        with torch.no_grad():
            return model.encode(texts, batch_size=args.batch_size, convert_to_tensor=True).float()

    want = encode(reference)
    student = SentenceTransformer(args.model, device="cpu")
    student.max_seq_length = args.max_length
    peak = [0.0]
    swapped = emulate_float16(student, peak)
    got = encode(student)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    print(
        json.dumps(
            {
                "model": args.model,
                "texts": len(texts),
                "float16_products": swapped,
                "min_cosine": round(cos.min().item(), 7),
                "mean_cosine": round(cos.mean().item(), 7),
                "max_abs_diff": (got - want).abs().max().item(),
                "largest_projection_value": peak[0],
                "non_finite": int((~torch.isfinite(got)).sum().item()),
            }
        )
    )


if __name__ == "__main__":
    main()
