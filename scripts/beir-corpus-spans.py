"""Random spans of a BEIR corpus's documents, as JSONL ({"text": ...} per
line): for each document, PER_DOCUMENT runs (default 1) of 1 to 3
consecutive sentences of its text, each chosen at random (seed fixed, so
runs may repeat or overlap), never its title. These are
Contriever-style crops, cut at sentence boundaries: shorter, query-length
texts drawn from the same corpus, with no queries and no judgements.
`make recover-minilm-spans` passes the file to `effir finetune
--train-texts` beside the corpus itself.

    python3 scripts/beir-corpus-spans.py DATASET OUT.jsonl [--per-document N] [--seed S]
"""
import argparse
import json
import os
import random
import re
import sys

from beir_text_files import open_text, write_texts

# A sentence ends at . ! or ? followed by white space and a capital letter,
# a digit or an opening bracket; abbreviations such as "e.g. the" stay whole.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
MIN_WORDS = 6
MAX_SENTENCES = 3


def sentences(text):
    return [s.strip() for s in SENTENCE_END.split(text) if len(s.split()) >= MIN_WORDS]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("out")
    parser.add_argument("--per-document", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.per_document < 1:
        parser.error("--per-document must be at least 1")
    dataset, out = args.dataset, args.out
    rng = random.Random(args.seed)
    spans = []
    documents = 0
    with open_text(os.path.join(dataset, "corpus.jsonl")) as f:
        for number, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError) as e:
                sys.exit(f"{dataset}/corpus.jsonl line {number}: not a BEIR document ({e})")
            documents += 1
            parts = sentences(text)
            if not parts:
                continue
            for _ in range(args.per_document):
                length = rng.randint(1, min(MAX_SENTENCES, len(parts)))
                start = rng.randint(0, len(parts) - length)
                spans.append(" ".join(parts[start : start + length]))
    if not spans:
        sys.exit(f"{dataset}: no document has a sentence of {MIN_WORDS} words or more")
    write_texts(out, spans)
    words = sum(len(s.split()) for s in spans) / len(spans)
    print(f"{out}: {len(spans)} spans of {documents} documents of {dataset}, {words:.1f} words on average")


if __name__ == "__main__":
    main()
