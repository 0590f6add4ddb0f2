"""Shared by the benchmark and parity scripts: texts from the vendored data."""

import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def scifact_documents(n):
    """The first `n` SciFact abstracts as `title + " " + text` (BEIR's document text)."""
    docs = []
    with gzip.open(ROOT / "data/scifact/corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append((d.get("title", "") + " " + d["text"]).strip())
            if len(docs) == n:
                break
    return docs


def scifact_queries(n):
    """The first `n` SciFact queries."""
    out = []
    with gzip.open(ROOT / "data/scifact/queries.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
