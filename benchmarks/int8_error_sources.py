#!/usr/bin/env python3
"""Where a dynamic int8 graph of a BERT-style encoder loses its cosine, and
whether SmoothQuant-style per-channel scaling gives it back: PyTorch fake
quantization, as ONNX Runtime's dynamic int8 computes it:

- activations per tensor, asymmetric uint8 over the whole batch
  (DynamicQuantizeLinear: scale = (max(0, max x) - min(0, min x)) / 255);
- weights per output channel, symmetric int8 (effir's `quantize_columns`).

    runs/venv-transformers/bin/python benchmarks/int8_error_sources.py models/all-MiniLM-L6-v2
    runs/venv-transformers/bin/python benchmarks/int8_error_sources.py models/all-MiniLM-L6-v2 --sweep 0.65 0.75 0.85 0.95

Prints, for 256 SciFact abstracts and 256 queries not used for calibration
(batches of 32, max length 256), the lowest and mean cosine of the
mean-pooled embeddings against float32 with: every product quantized; one
kind of product quantized at a time; and each product's input divided by
s_j = max|x_j|^a / max|W_j|^(1-a) (folded into the weight's input rows),
measured on 256 other abstracts.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_sample import scifact_documents, scifact_queries  # noqa: E402

KINDS = {
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "out": ("attention.output.dense",),
    "up": ("intermediate.dense",),
    "down": ("output.dense",),
}


def fake_quant_activation(x):
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if scale == 0:
        return x
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return (q - zp) * scale


def fake_quant_weight(w):  # (out, in), per output channel
    s = w.abs().amax(dim=1, keepdim=True) / 127.0
    s[s == 0] = 1.0
    return torch.clamp(torch.round(w / s), -127, 127) * s


def linears(model):
    for i, layer in enumerate(model.encoder.layer):
        for kind, names in KINDS.items():
            for name in names:
                yield i, kind, name, layer.get_submodule(name)


def embed(model, tok, texts):
    out = []
    with torch.no_grad():
        for b in range(0, len(texts), 32):
            enc = tok(texts[b : b + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def input_maxima(model, tok, texts):
    maxima = {}
    hooks = []
    for i, kind, name, lin in linears(model):
        def hook(_m, args, key=(i, name)):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[key] = torch.maximum(maxima[key], x) if key in maxima else x
        hooks.append(lin.register_forward_pre_hook(hook))
    embed(model, tok, texts)
    for h in hooks:
        h.remove()
    return maxima


def quantized(base, quantize_kinds, smooth=None, alpha=0.5, maxima=None):
    """A copy of `base` with the products of `quantize_kinds` fake-quantized,
    each input smoothed first when `smooth` names its kind."""
    import copy

    model = copy.deepcopy(base)
    for i, kind, name, lin in linears(model):
        if kind not in quantize_kinds:
            continue
        w = lin.weight.data
        s = None
        if smooth and kind in smooth:
            xmax = maxima[(i, name)].clamp(min=1e-5)
            # One factor per input channel, shared by products that read the
            # same input (q, k, v): their largest weight per input row.
            ws = [model.encoder.layer[i].get_submodule(n).weight.data for n in KINDS[kind]]
            wmax = torch.stack([x.abs().amax(0) for x in ws]).amax(0).clamp(min=1e-5)
            s = xmax.pow(alpha) / wmax.pow(1 - alpha)
            w = w * s  # columns = input channels
        lin.weight.data = fake_quant_weight(w)

        def pre(_m, args, s=s):
            x = args[0] if s is None else args[0] / s
            return (fake_quant_activation(x),)

        lin.register_forward_pre_hook(pre)
    return model


def main():
    path = sys.argv[1]
    sweep = [float(a) for a in sys.argv[3:]] if sys.argv[2:3] == ["--sweep"] else None
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    torch.set_num_threads(2)
    docs = scifact_documents(512)
    calib, held = docs[:256], docs[256:]
    texts = held + scifact_queries(256)
    ref = embed(base, tok, texts)
    maxima = input_maxima(base, tok, calib)

    def report(label, model):
        cos = (embed(model, tok, texts) * ref).sum(-1)
        d, q = cos[:256], cos[256:]
        print(f"{label:48s} docs min {d.min():.5f} mean {d.mean():.5f}   queries min {q.min():.5f} mean {q.mean():.5f}", flush=True)

    every = set(KINDS)
    if sweep:
        # Only the strength of smoothing every product.
        for alpha in sweep:
            report(f"all int8, smooth all a={alpha}", quantized(base, every, every, alpha, maxima))
        return
    report("all products int8", quantized(base, every))
    for kind in KINDS:
        report(f"only {kind} int8", quantized(base, {kind}))
    for alpha in (0.5, 0.75):
        for smooth in (every, {"qkv", "up"}, {"down"}):
            label = f"all int8, smooth {'+'.join(sorted(smooth))} a={alpha}"
            report(label, quantized(base, every, smooth, alpha, maxima))


if __name__ == "__main__":
    main()
