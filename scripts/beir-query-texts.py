"""The texts of one split's queries of a BEIR dataset, as JSONL
({"text": ...} per line): only the queries, never their judgements.
`make recover-minilm-query-text` passes the file to `effir finetune
--train-texts` (read as documents: MiniLM has no query prompt). For a model
with a query prompt, `effir finetune --train-queries DATASET --split SPLIT`
reads the same queries itself and writes them with the prompt.

    python3 scripts/beir-query-texts.py DATASET SPLIT OUT.jsonl
"""
import csv
import json
import os
import sys

from beir_text_files import open_text, write_texts


def main():
    dataset, split, out = sys.argv[1:]
    ids = set()
    with open(os.path.join(dataset, "qrels", f"{split}.tsv"), encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t"):
            if row and row[0] != "query-id":
                ids.add(row[0])
    texts = []
    with open_text(os.path.join(dataset, "queries.jsonl")) as f:
        for line in f:
            query = json.loads(line)
            if query["_id"] in ids:
                texts.append(query["text"])
    if not texts:
        sys.exit(f"{dataset}: no queries of split {split}")
    write_texts(out, texts)
    print(f"{out}: {len(texts)} queries of {dataset} {split}")


if __name__ == "__main__":
    main()
