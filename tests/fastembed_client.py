#!/usr/bin/env python3
"""fastembed, a real tokenizer-only client, on an effir export: the export
directory is registered as a custom model (mean pooling, normalised) and
loaded from its path, as a user of fastembed would serve it; fastembed reads
tokenizer.json and tokenizer_config.json itself. Prints the embeddings of
the texts (one JSON list per line of --texts) as JSON.

  fastembed_client.py --export DIR --texts TEXTS.json --dim 384
"""

import argparse
import json

from fastembed import TextEmbedding
from fastembed.common.model_description import ModelSource, PoolingType


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--export", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--dim", type=int, required=True)
    args = parser.parse_args()
    texts = json.load(open(args.texts))
    name = "effir/export-under-test"
    TextEmbedding.add_custom_model(
        model=name,
        pooling=PoolingType.MEAN,
        normalization=True,
        sources=ModelSource(hf=name),
        dim=args.dim,
        model_file="model.onnx",
    )
    model = TextEmbedding(model_name=name, specific_model_path=args.export, threads=2)
    embeddings = [e.tolist() for e in model.embed(texts, batch_size=4)]
    print(json.dumps(embeddings))


if __name__ == "__main__":
    main()
