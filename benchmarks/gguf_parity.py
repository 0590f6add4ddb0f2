#!/usr/bin/env python3
"""Parity of `effir import-gguf` with transformers' own GGUF loader on a real
file: the same tokenizer ids, the same dequantized weights, the same last
hidden states on every token and the same last-token embeddings.

  gguf_parity.py --gguf FILE --model EFFIR_DIR --texts TEXTS.txt \
                 --embeddings EFFIR.npy --out REPORT.json [--min-cosine 0.99999]

transformers reads FILE itself (`from_pretrained(dir, gguf_file=...)`,
its own dequantization and tokenizer conversion). effir's side is the
directory `effir import-gguf` wrote: its tokenizer.json (through the
`tokenizers` library effir links), its model.safetensors, and EFFIR.npy,
`effir embed`'s last-token embeddings of TEXTS (candle, EOS appended
unless a text already ends with it).
The hidden states of effir's directory are computed by transformers'
standard (non-GGUF) loader, so weights and config are checked through a
forward pass effir does not control; the candle forward is checked
through the embeddings.

Exits 1 when a gate fails.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer


def cosine_rows(a, b):
    a = a.double()
    b = b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-cosine", type=float, default=0.99999)
    args = ap.parse_args()
    gguf = Path(args.gguf)
    texts = [line.rstrip("\n") for line in open(args.texts, encoding="utf-8") if line.strip()]

    started = time.time()
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    effir_tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    effir_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load_s = time.time() - started

    # Weights: every tensor of effir's file against transformers' dequantized one.
    hf_state = hf.state_dict()
    effir_state = load_file(str(Path(args.model) / "model.safetensors"))
    worst_weight = (None, 0.0)
    identical = 0
    for name, tensor in effir_state.items():
        diff = (tensor.float() - hf_state[name].float()).abs().max().item()
        identical += diff == 0.0
        if diff > worst_weight[1]:
            worst_weight = (name, diff)
    missing = sorted(set(k for k in hf_state if not k.startswith("lm_head")) - set(effir_state))

    # Tokenizer ids (effir strips texts, as sentence-transformers does).
    id_mismatches = []
    for text in texts:
        want = hf_tok(text.strip(), add_special_tokens=True)["input_ids"]
        got = effir_tok.encode(text.strip(), add_special_tokens=True).ids
        if want != got:
            id_mismatches.append({"text": text, "transformers": want, "effir": got})

    # Hidden states on every token, and last-token embeddings.
    eos = hf.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    effir_embeddings = torch.from_numpy(np.load(args.embeddings))
    lowest_token, lowest_embedding, tokens = 1.0, 1.0, 0
    for i, text in enumerate(texts):
        ids = hf_tok(text.strip(), add_special_tokens=True)["input_ids"]
        # effir's rule for last-token pooling: EOS appended unless the text
        # already ends with it.
        ids = ids if ids and ids[-1] == eos else ids + [eos]
        batch = torch.tensor([ids])
        with torch.no_grad():
            want = hf.model(batch).last_hidden_state[0]
            got = effir_model.model(batch).last_hidden_state[0]
        lowest_token = min(lowest_token, cosine_rows(got, want).min().item())
        tokens += len(ids)
        lowest_embedding = min(lowest_embedding, cosine_rows(effir_embeddings[i : i + 1], want[-1:]).item())

    report = {
        "gguf": gguf.name,
        "texts": len(texts),
        "tokens": tokens,
        "token_id_mismatches": id_mismatches,
        "tensors_compared": len(effir_state),
        "tensors_bit_identical": identical,
        "largest_weight_difference": {"tensor": worst_weight[0], "max_abs": worst_weight[1]},
        "tensors_missing_from_effir": missing,
        "lowest_hidden_state_cosine": lowest_token,
        "lowest_embedding_cosine": lowest_embedding,
        "min_cosine": args.min_cosine,
        "load_seconds": round(load_s, 1),
    }
    failed = bool(id_mismatches or missing) or min(lowest_token, lowest_embedding) < args.min_cosine
    report["passed"] = not failed
    Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "token_id_mismatches"}, ensure_ascii=False))
    if id_mismatches:
        print(f"{len(id_mismatches)} texts tokenized differently, first: {id_mismatches[0]}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
