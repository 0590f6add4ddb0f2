"""What the BEIR text scripts share: reading a dataset's JSONL file, plain
or gzipped, and writing texts as JSONL ({"text": ...} per line) that
appears whole or not at all."""
import gzip
import json
import os
import sys


def open_text(path):
    """`path`, or `path.gz`, opened as UTF-8 text; exits naming both when
    neither exists."""
    if os.path.exists(path):
        return open(path, encoding="utf-8")
    if os.path.exists(path + ".gz"):
        return gzip.open(path + ".gz", "rt", encoding="utf-8")
    sys.exit(f"{path}: no such file (nor {path}.gz): not a BEIR dataset")


def write_texts(out, texts):
    """`texts` into `out` as JSONL, through a temporary file renamed into
    place."""
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, out)
