#!/usr/bin/env python3
"""Prototype: narrowing a BERT retriever's attention by whole heads, with the
attention output projection re-fitted by least squares, before effir builds
it. Answers one question with numbers: how much retrieval quality do the
least useful heads of all-MiniLM-L6-v2 carry, on data the choice never saw?

    runs/venv-transformers/bin/python benchmarks/head_pruning_prototype.py \
        --model models/all-MiniLM-L6-v2 --keep 0.75 [--no-refit] \
        --data data/scifact --data data/cranfield

Label-free, as effir's MLP reconstruction is (`pipeline/src/compress/reconstruct.rs`):
- calibration text: the first 256 SciFact abstracts and the text of the
  first 256 SciFact *train* queries (no judgements);
- a head's importance: the mean squared norm of its contribution to the
  attention output, `ctx_h W_o[:, h]^T`, over the calibration tokens;
- each layer keeps `round(keep * heads)` heads (the most important);
- layers are repaired in order: with the earlier layers already narrowed and
  re-fitted, layer l's full attention output on the calibration tokens is
  the target, and `W_o`, `b_o` are re-fitted on the kept heads' context by
  ridge least squares (ridge 1e-4 of the mean diagonal). Heads do not read
  each other, so the kept heads' context is the same before and after.

Scores: nDCG@10 (and Recall@100) with exact cosine search, documents as
title + " " + text, max length 256, computed here as trec_eval computes them (the unpruned model reproduces
the reference scores of ../shared/models/README.md).
"""

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def read_qrels(path):
    qrels = {}
    for i, line in enumerate(path.read_text().splitlines()):
        fields = line.split()
        if not fields or (i == 0 and not fields[-1].lstrip("-").isdigit()):
            continue
        qrels.setdefault(fields[0], {})[fields[-2]] = int(fields[-1])
    return qrels


def ndcg_recall(ranked, judged, k=10, depth=100):
    """trec_eval's ndcg_cut.10 (gain = the judgement, log2 discount) and
    recall.100 (judgements above 0)."""
    gain = sum(judged.get(doc, 0) / np.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    best = sum(g / np.log2(rank + 2) for rank, g in enumerate(ideal))
    relevant = {doc for doc, g in judged.items() if g > 0}
    return (gain / best if best > 0 else 0.0,
            len(relevant & set(ranked[:depth])) / len(relevant) if relevant else 0.0)


def read_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def calibration_texts(scifact, n=256):
    corpus = read_jsonl(scifact / "corpus.jsonl.gz")[:n]
    train = set(read_qrels(scifact / "qrels" / "train.tsv"))
    queries = [q["text"] for q in read_jsonl(scifact / "queries.jsonl.gz") if q["_id"] in train][:n]
    docs = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    return docs + queries


def capture(st, layer, texts, batch=32):
    """Input and output of layer `layer`'s attention output projection, over
    the non-padding calibration tokens."""
    bert = st[0].auto_model
    dense = bert.encoder.layer[layer].attention.output.dense
    got = {}

    def hook(_module, inputs, output):
        got["x"], got["y"] = inputs[0], output

    handle = dense.register_forward_hook(hook)
    xs, ys = [], []
    tok = st.tokenizer
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
                bert(**enc)
                keep = enc["attention_mask"].bool()
                xs.append(got["x"][keep].double())
                ys.append(got["y"][keep].double())
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys)


def narrow_layer(st, layer, keep_heads, refit, ridge, texts):
    bert = st[0].auto_model
    attn = bert.encoder.layer[layer].attention
    heads = bert.config.num_attention_heads
    d = attn.self.attention_head_size
    x, y = capture(st, layer, texts)
    w = attn.output.dense.weight.double()  # (H, heads*d)
    importance = []
    for h in range(heads):
        contribution = x[:, h * d : (h + 1) * d] @ w[:, h * d : (h + 1) * d].T
        importance.append(float((contribution**2).sum(1).mean()))
    order = sorted(range(heads), key=lambda h: -importance[h])
    kept = sorted(order[:keep_heads])
    channels = torch.tensor([h * d + j for h in kept for j in range(d)])
    before = None
    with torch.no_grad():
        for name in ("query", "key", "value"):
            lin = getattr(attn.self, name)
            new = torch.nn.Linear(lin.in_features, len(channels))
            new.weight.copy_(lin.weight[channels])
            new.bias.copy_(lin.bias[channels])
            setattr(attn.self, name, new)
        out = attn.output.dense
        new = torch.nn.Linear(len(channels), out.out_features)
        xk = x[:, channels]
        sliced_w = out.weight.double()[:, channels]
        sliced = xk @ sliced_w.T + out.bias.double()
        before = float(((sliced - y) ** 2).sum() / (y**2).sum())
        if refit:
            a = torch.cat([xk, torch.ones(len(xk), 1, dtype=xk.dtype)], 1)
            gram = a.T @ a
            gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
            sol = torch.linalg.solve(gram, a.T @ y)  # (C+1, H)
            new.weight.copy_(sol[:-1].T.float())
            new.bias.copy_(sol[-1].float())
            fitted = a @ sol
            after = float(((fitted - y) ** 2).sum() / (y**2).sum())
        else:
            new.weight.copy_(out.weight[:, channels])
            new.bias.copy_(out.bias)
            after = before
        attn.output.dense = new
    attn.self.num_attention_heads = len(kept)
    attn.self.all_head_size = len(channels)
    return {"layer": layer, "kept": kept, "importance": [round(v, 4) for v in importance],
            "relative_error_sliced": round(before, 5), "relative_error": round(after, 5)}


def score(st, data, max_length=256):
    qrels = read_qrels(data / "qrels" / "test.tsv")
    corpus = read_jsonl(data / "corpus.jsonl.gz")
    queries = [q for q in read_jsonl(data / "queries.jsonl.gz") if q["_id"] in qrels]
    st.max_seq_length = max_length
    docs = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    d = st.encode(docs, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    q = st.encode([x["text"] for x in queries], batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    scores = q @ d.T
    per_query = []
    for i, query in enumerate(queries):
        ranked = [corpus[j]["_id"] for j in np.argsort(-scores[i], kind="stable")[:100]]
        per_query.append(ndcg_recall(ranked, qrels[query["_id"]]))
    ndcg, recall = np.mean(per_query, axis=0)
    return {"ndcg@10": round(float(ndcg), 4), "recall@100": round(float(recall), 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    ap.add_argument("--keep", type=float, required=True, help="fraction of each layer's heads kept (1: none removed)")
    ap.add_argument("--no-refit", action="store_true")
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--calib", default=str(ROOT / "data/scifact"))
    ap.add_argument("--data", action="append", required=True)
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    st = SentenceTransformer(args.model, device="cpu", trust_remote_code=True)
    st.max_seq_length = 256
    texts = calibration_texts(Path(args.calib))
    bert = st[0].auto_model
    heads = bert.config.num_attention_heads
    keep_heads = round(args.keep * heads)
    layers = [] if keep_heads == heads else [
        narrow_layer(st, l, keep_heads, not args.no_refit, args.ridge, texts)
        for l in range(bert.config.num_hidden_layers)]
    result = {"model": args.model, "keep": args.keep, "heads_kept": keep_heads, "refit": not args.no_refit,
              "layers": layers}
    for data in args.data:
        result[Path(data).name] = score(st, Path(data))
        print(json.dumps({Path(data).name: result[Path(data).name]}), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
