#!/usr/bin/env python3
"""transformers and sentence-transformers (PyTorch) on a directory effir
pruned or fine-tuned: loads it as a user would, embeds the texts and
compares with effir's embeddings of the same texts.

  transformers_client.py --model DIR --texts TEXTS.json --embeddings EFFIR.npy
                         --loader transformers|sentence-transformers
                         [--plain] [--min-cosine 0.99999] [--save DIR]

--loader transformers: `AutoModel.from_pretrained` and `AutoTokenizer`, then
  the directory's sentence-transformers modules (pooling, dense, normalise)
  applied by this script, one text at a time, with effir's input rule for
  last-token pooling (EOS appended when the tokenizer did not append it).
--loader sentence-transformers: `SentenceTransformer(DIR).encode`.
--plain: the directory must load without remote code (no `auto_map`);
  otherwise it must name effir's code in `auto_map` and load with
  `trust_remote_code=True`, as an instance of effir's class.
--save: sentence-transformers saves the loaded model there (round trip).

Exits 1, printing the lowest cosine, when a text's cosine is below
--min-cosine.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def check_loading_form(config, plain):
    auto_map = config.get("auto_map", {})
    if plain:
        if auto_map or "effir_intermediate_sizes" in config:
            sys.exit(f"expected a plain config, found auto_map={auto_map}")
        return
    for key in ("AutoConfig", "AutoModel"):
        if "_effir_" not in auto_map.get(key, ""):
            sys.exit(f"auto_map[{key!r}] does not name effir's code: {auto_map}")
    if "effir_intermediate_sizes" not in config:
        sys.exit("config.json has no effir_intermediate_sizes")


def check_class(model, plain):
    name = type(model).__name__
    if plain == name.startswith("Effir"):
        sys.exit(f"loaded as {name}, expected {'the source class' if plain else 'an effir class'}")


def modules(model_dir):
    with open(os.path.join(model_dir, "modules.json")) as f:
        return json.load(f)


def module_kind(module):
    return module["type"].rsplit(".", 1)[-1]


def pool(hidden, model_dir, module):
    with open(os.path.join(model_dir, module["path"], "config.json")) as f:
        config = json.load(f)
    if config.get("pooling_mode_mean_tokens") or config.get("pooling_mode") == "mean":
        return hidden.mean(dim=0)
    if config.get("pooling_mode_lasttoken") or config.get("pooling_mode") == "lasttoken":
        return hidden[-1]
    if config.get("pooling_mode_cls_token") or config.get("pooling_mode") == "cls":
        return hidden[0]
    sys.exit(f"{module['path']}/config.json: pooling this client does not implement: {config}")


def last_token_pooling(model_dir):
    for module in modules(model_dir):
        if module_kind(module) == "Pooling":
            with open(os.path.join(model_dir, module["path"], "config.json")) as f:
                config = json.load(f)
            return bool(config.get("pooling_mode_lasttoken") or config.get("pooling_mode") == "lasttoken")
    return False


def dense(x, model_dir, module):
    from safetensors.torch import load_file

    path = os.path.join(model_dir, module["path"])
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(path, "model.safetensors"))
    y = x @ weights["linear.weight"].T
    if "linear.bias" in weights:
        y = y + weights["linear.bias"]
    activation = config.get("activation_function", "torch.nn.modules.linear.Identity")
    if activation.endswith("Identity"):
        return y
    if activation.endswith("Tanh"):
        return torch.tanh(y)
    sys.exit(f"{module['path']}: activation this client does not implement: {activation}")


def embed_with_transformers(model_dir, texts, plain):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=not plain).eval()
    check_class(model, plain)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = load_config(model_dir).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    append_eos = last_token_pooling(model_dir) and eos is not None
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if append_eos and ids[-1] != eos:
            ids = ids + [eos]
        input_ids = torch.tensor([ids])
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        if "token_type_ids" in tokenizer.model_input_names:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        with torch.no_grad():
            x = model(**kwargs).last_hidden_state[0]
            for module in modules(model_dir)[1:]:
                kind = module_kind(module)
                if kind == "Pooling":
                    x = pool(x, model_dir, module)
                elif kind == "Dense":
                    x = dense(x, model_dir, module)
                elif kind == "Normalize":
                    x = torch.nn.functional.normalize(x, dim=-1)
                else:
                    sys.exit(f"modules.json: a module this client does not implement: {module}")
        out.append(x.float().numpy())
    return np.stack(out)


def embed_with_sentence_transformers(model_dir, texts, plain, save):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, trust_remote_code=not plain, device="cpu")
    backbone = model[0].auto_model
    check_class(backbone, plain)
    embeddings = model.encode(texts, batch_size=4, convert_to_numpy=True)
    if save:
        model.save(save)
    return embeddings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--embeddings", required=True)
    parser.add_argument("--loader", choices=["transformers", "sentence-transformers"], required=True)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--min-cosine", type=float, default=0.99999)
    parser.add_argument("--save")
    args = parser.parse_args()
    torch.manual_seed(0)
    with open(args.texts) as f:
        texts = json.load(f)
    check_loading_form(load_config(args.model), args.plain)
    if args.loader == "transformers":
        got = embed_with_transformers(args.model, texts, args.plain)
    else:
        got = embed_with_sentence_transformers(args.model, texts, args.plain, args.save)
    want = np.load(args.embeddings)
    if got.shape != want.shape:
        sys.exit(f"{args.loader}: embeddings {got.shape}, effir's {want.shape}")
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    cosines = (unit(got.astype(np.float64)) * unit(want.astype(np.float64))).sum(axis=1)
    lowest = float(cosines.min())
    print(json.dumps({"loader": args.loader, "texts": len(texts), "lowest_cosine": lowest}))
    if lowest < args.min_cosine:
        sys.exit(f"{args.loader}: lowest cosine {lowest:.7f} < {args.min_cosine} (text {int(cosines.argmin())})")


if __name__ == "__main__":
    main()
