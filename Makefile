# effir: every stage is a target; each reads and writes files on disk.
#   make embed   build, fetch all-MiniLM-L6-v2, embed the SciFact queries
#   make test    everything the test suite needs, then the tests
#   make lint    rustfmt and clippy, warnings as errors

MODELS  ?= models
MINILM  ?= $(MODELS)/all-MiniLM-L6-v2
GEMMA   ?= $(MODELS)/embeddinggemma-300m
DATA    ?= data/scifact
RUNS    ?= runs
EFFIR   := target/release/effir
PYTHON  ?= python3

.PHONY: all system-deps build models test lint embed python-deps fixtures \
        bench-embed parity-embeddinggemma clean

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

# Main job of this stage: embed the SciFact queries with all-MiniLM-L6-v2.
embed: build models
	$(EFFIR) embed --model $(MINILM) --input $(DATA)/queries.jsonl.gz --output $(RUNS)/scifact-queries.minilm.npy

# Python references (PyTorch CPU, about 6 GB of wheels): only for the
# fixtures, the parity check of large models and the speed comparison.
python-deps:
	$(PYTHON) -c "import torch, transformers, sentence_transformers" 2>/dev/null || \
	  $(PYTHON) -m pip install -q torch transformers sentence-transformers safetensors numpy

fixtures: python-deps models
	$(PYTHON) tests/fixtures/make_reference.py --minilm $(MINILM)

bench-embed: build models python-deps
	$(PYTHON) benchmarks/embed_speed.py --model $(MINILM)

parity-embeddinggemma: build $(GEMMA)/model.safetensors python-deps
	$(PYTHON) benchmarks/parity_embeddinggemma.py --model $(GEMMA)

clean:
	cargo clean
	rm -rf $(RUNS)
