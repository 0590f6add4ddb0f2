"""Peak RSS of ONNX Runtime opening a graph and running one batch of 4 x 256
tokens under several session settings, each in a process of its own.

    python benchmarks/ort_weight_memory.py GRAPH.onnx [GRAPH.onnx ...]

Used for RESULTS.md's half-precision memory figures (issue #18); needs
onnxruntime (runs/venv-fastembed has 1.32)."""
import json, resource, subprocess, sys

SETTINGS = {
    "default optimizations": {},
    "default, without ConstantFolding": {"nofold": True},
    "optimizations off": {"opt": "disable"},
    "optimizations off, CPU arena off": {"opt": "disable", "arena": False},
}

CHILD = r'''
import json, resource, sys
import numpy as np, onnxruntime as ort
cfg = json.loads(sys.argv[2])
so = ort.SessionOptions()
so.intra_op_num_threads = 2
if cfg.get("opt") == "disable":
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
elif cfg.get("opt") == "basic":
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
if cfg.get("arena") is False:
    so.enable_cpu_mem_arena = False
if cfg.get("pattern") is False:
    so.enable_mem_pattern = False
if cfg.get("order") == "priority":
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
kw = {"disabled_optimizers": ["ConstantFolding"]} if cfg.get("nofold") else {}
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"], **kw)
after_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
feeds = {}
for i in s.get_inputs():
    feeds[i.name] = np.ones((4, 256), dtype=np.int64)
s.run(None, feeds)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"after_open": after_open, "peak": peak}))
'''

for graph in sys.argv[1:]:
    print(f"## {graph}")
    for name, cfg in SETTINGS.items():
        out = subprocess.run([sys.executable, "-c", CHILD, graph, json.dumps(cfg)], capture_output=True, text=True)
        if out.returncode != 0:
            print(name, "failed", out.stderr[-500:])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:36s} after opening {r['after_open']/1e9:5.2f} GB, peak {r['peak']/1e9:5.2f} GB")
