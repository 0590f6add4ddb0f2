"""The table of `make scale-7b` / `make scale-3b`: each stage's wall time
and peak RSS (from `/usr/bin/time -v`) against the model's bf16 weight
size, and the 1.3x bound of issue #18.

    python benchmarks/scale_summary.py SHAPE MODEL_DIR RESULTS_DIR STAGE...
"""
import json
import os
import re
import sys

BOUND = 1.3


def weight_bytes(model):
    return sum(
        os.path.getsize(os.path.join(model, f))
        for f in os.listdir(model)
        if f.endswith(".safetensors")
    )


def parse_time(path):
    text = open(path).read()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds, rss_kb * 1024


def main():
    shape, model, results, *stages = sys.argv[1:]
    weights = weight_bytes(model)
    rows = []
    worst = 0.0
    for stage in stages:
        seconds, rss = parse_time(os.path.join(results, f"{stage}.time"))
        ratio = rss / weights
        worst = max(worst, ratio)
        rows.append({"stage": stage, "seconds": seconds, "peak_rss_bytes": rss, "of_weights": ratio})
    lines = [
        f"# `{shape}`: streamed stages (`benchmarks/scale.sh`)",
        "",
        f"bf16 weights of the source model: {weights / 1e9:.2f} GB; bound: every stage's "
        f"peak RSS <= {BOUND} x those weights = {BOUND * weights / 1e9:.2f} GB (export and "
        "validate read the pruned model, which is smaller).",
        "",
        "| stage | wall time | peak RSS | of the source's bf16 weights |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['seconds']:.0f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['of_weights']:.2f}x |"
        )
    verdict = "met" if worst <= BOUND else "MISSED"
    lines += ["", f"Largest peak: {worst:.2f}x the weights; the {BOUND}x bound is {verdict}."]
    validation = os.path.join(results, "validation", "validation.json")
    if os.path.exists(validation):
        parity = json.load(open(validation)).get("parity") or {}
        if parity:
            lines.append(
                f"Parity, candle (streamed) against ONNX Runtime on {parity.get('texts')} texts: "
                f"lowest cosine {parity.get('min_cosine'):.7f}."
            )
    text = "\n".join(lines) + "\n"
    open(os.path.join(results, "summary.md"), "w").write(text)
    json.dump(
        {"shape": shape, "weight_bytes": weights, "stages": rows, "bound": BOUND},
        open(os.path.join(results, "summary.json"), "w"),
        indent=2,
    )
    print(text, end="")
    if worst > BOUND:
        sys.exit(1)


if __name__ == "__main__":
    main()
