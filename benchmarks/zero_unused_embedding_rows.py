"""Zero the rows of a graph's token-embedding table that no given text uses.

  zero_rows.py GRAPH_DIR OUT_DIR TEXTS_DIR

Only the table changes (same names, shapes and nodes), so the graph computes
exactly what the original computes on those texts; the zeros compress to
nothing, so the graph fits a small payload. Token ids are a superset: every
text tokenized whole (with and without special tokens) as effir's
EmbeddingGemma document template writes it, plus every added/special token.
"""
import json, os, shutil, sys
import numpy as np, onnx
from onnx import numpy_helper
from tokenizers import Tokenizer

src, out, texts = sys.argv[1:4]
tok = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
ids = set(range(16))
for t in tok.get_added_tokens_decoder():
    ids.add(t)
for line in open(os.path.join(texts, "corpus.jsonl")):
    d = json.loads(line)
    text = f"title: {d.get('title') or 'none'} | text: {d['text']}"
    for special in (True, False):
        ids.update(tok.encode(text, add_special_tokens=special).ids)
model = onnx.load(os.path.join(src, "model.onnx"))
tables = [t for t in model.graph.initializer if list(t.dims)[:1] == [tok.get_vocab_size(with_added_tokens=True)] or (len(t.dims) == 2 and t.dims[0] == 262144)]
assert len(tables) == 1, [(t.name, list(t.dims)) for t in tables]
table = tables[0]
values = numpy_helper.to_array(table).copy()
keep = np.zeros(values.shape[0], bool)
keep[sorted(i for i in ids if i < values.shape[0])] = True
values[~keep] = 0
table.CopyFrom(numpy_helper.from_array(values, table.name))
if os.path.exists(out):
    shutil.rmtree(out)
shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx_data"))
onnx.save(model, os.path.join(out, "model.onnx"))
print(f"{table.name} {list(table.dims)}: kept {keep.sum()} of {len(keep)} rows")
