"""A probe of weight-space interpolation (WiSE-FT, Wortsman et al. 2022)
between two fine-tunes of one pruned model: writes a model directory whose
weights are (1 - alpha) * A + alpha * B, the other files copied from A.
Score it with `effir eval`.

    python benchmarks/weight_interpolation.py A B ALPHA OUT
"""
import os
import shutil
import sys

from safetensors.numpy import load_file, save_file


def main():
    a, b, alpha, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    if os.path.exists(out):
        sys.exit(f"{out}: already exists")
    ta = load_file(os.path.join(a, "model.safetensors"))
    tb = load_file(os.path.join(b, "model.safetensors"))
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        sys.exit(f"{a} and {b} do not have the same tensors")
    tmp = out + ".tmp"
    shutil.copytree(a, tmp)
    mixed = {k: ((1 - alpha) * ta[k] + alpha * tb[k]).astype(ta[k].dtype) for k in ta}
    save_file(mixed, os.path.join(tmp, "model.safetensors"))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
