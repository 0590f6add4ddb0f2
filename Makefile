# effir: every stage is a target; each reads and writes files on disk.
#   make eval    build, fetch all-MiniLM-L6-v2, evaluate it on SciFact (main job)
#   make test    everything the test suite needs, then the tests
#   make lint    rustfmt and clippy, warnings as errors

MODELS  ?= models
MINILM  ?= $(MODELS)/all-MiniLM-L6-v2
GEMMA   ?= $(MODELS)/embeddinggemma-300m
DATA    ?= data/scifact
RUNS    ?= runs
EFFIR   := target/release/effir
PYTHON  ?= python3

.PHONY: all system-deps build models test lint embed eval eval-scifact python-deps \
        fixtures metric-references bench-embed parity-embeddinggemma clean

all: build

system-deps:
	scripts/install-system-deps.sh

build: system-deps
	cargo build --release

$(MINILM)/model.safetensors: | system-deps
	scripts/fetch-model.sh minilm $(MINILM)

$(GEMMA)/model.safetensors: | system-deps
	scripts/fetch-model.sh embeddinggemma $(GEMMA)

models: $(MINILM)/model.safetensors

# Model tests need optimised code: candle is ~100x slower at opt-level 0.
test: system-deps models
	EFFIR_MINILM_DIR=$(MINILM) cargo test --release --workspace

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# Embed the SciFact queries with all-MiniLM-L6-v2.
embed: build models
	$(EFFIR) embed --model $(MINILM) --input $(DATA)/queries.jsonl.gz --output $(RUNS)/scifact-queries.minilm.npy

# Main job: all-MiniLM-L6-v2 on SciFact test (nDCG@10, Recall@100, MRR, ...).
eval: build models
	$(EFFIR) eval --model $(MINILM) --data $(DATA) --split test --out $(RUNS)/scifact-minilm

# The same, checked against sentence-transformers + pytrec_eval (within 0.002).
eval-scifact: eval
	$(PYTHON) benchmarks/check_eval.py $(RUNS)/scifact-minilm/metrics.json tests/fixtures/eval/scifact-minilm-st.json

# Python references (PyTorch CPU, about 6 GB of wheels): only for the
# fixtures, the parity check of large models and the speed comparison.
python-deps:
	$(PYTHON) -c "import torch, transformers, sentence_transformers" 2>/dev/null || \
	  $(PYTHON) -m pip install -q torch transformers sentence-transformers safetensors numpy

fixtures: python-deps models
	$(PYTHON) tests/fixtures/make_reference.py --minilm $(MINILM)

# pytrec_eval's numbers for the committed run files, and sentence-transformers'
# retrieval scores that `effir eval` is checked against.
metric-references: python-deps models
	$(PYTHON) -c "import pytrec_eval" 2>/dev/null || $(PYTHON) -m pip install -q pytrec-eval-terrier
	$(PYTHON) tests/fixtures/eval/make_metric_reference.py
	$(PYTHON) benchmarks/reference_eval.py --model $(MINILM) --data data/cranfield --out tests/fixtures/eval/cranfield-minilm-st.json
	$(PYTHON) benchmarks/reference_eval.py --model $(MINILM) --data data/scifact --out tests/fixtures/eval/scifact-minilm-st.json

bench-embed: build models python-deps
	$(PYTHON) benchmarks/embed_speed.py --model $(MINILM) --repeats 2

parity-embeddinggemma: build $(GEMMA)/model.safetensors python-deps
	$(PYTHON) benchmarks/parity_embeddinggemma.py --model $(GEMMA)

clean:
	cargo clean
	rm -rf $(RUNS)
