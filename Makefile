# effir: every stage is a target; each reads and writes files on disk.
#   make eval    build, fetch all-MiniLM-L6-v2, evaluate it on SciFact (main job)
#   make test    everything the test suite needs, then the tests
#   make lint    rustfmt and clippy, warnings as errors

MODELS  ?= models
MINILM  ?= $(MODELS)/all-MiniLM-L6-v2
GEMMA   ?= $(MODELS)/embeddinggemma-300m
DATA    ?= data/scifact
HELDOUT ?= data/cranfield
RUNS    ?= runs
EFFIR   := target/release/effir
PYTHON  ?= python3

.PHONY: all system-deps build models test lint fuzz embed eval eval-scifact python-deps \
        fixtures metric-references bench-embed profile-embed bench-analyze parity-embeddinggemma \
        onnxruntime export export-pruned validate validate-pruned validate-prune-minilm bench-onnx parity-embeddinggemma-onnx \
        finetune-minilm finetune-minilm-2ep recover-minilm frontier-minilm frontier-embeddinggemma precision-checks prune-minilm-narrow prune-minilm-refit prune-embeddinggemma-refit recover-embeddinggemma gguf-parity smollm2-st smollm2-distill smollm2-retriever drop-study-smollm2 prune-smollm2 results-smollm2 bench-training-memory recover-minilm-labeled recover-minilm-query-text recover-minilm-spans recover-minilm-variant recover-minilm-gradual recover-minilm-gradual-70 recover-minilm-gradual-combined recover-minilm-gradual-combined-replay frontier-minilm-gradual int8-validate-minilm bench-gradual shard-scifact scale-7b scale-3b finetune-minilm-unpruned finetune-minilm-unpruned-2ep recover-minilm-tokens recover-minilm-seeds bench-finetune profile-finetune optimum-fixtures rewrite-minilm \
        analyze-minilm drop-study-minilm prune-minilm results-minilm \
        analyze-embeddinggemma drop-study-embeddinggemma results-embeddinggemma clean

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
# The ONNX Runtime CPU library (onnxruntime wheel) and Python onnx, linked
# where effir looks by default (see scripts/install-onnxruntime.sh).
onnxruntime:
	scripts/install-onnxruntime.sh

# fastembed, the tokenizer-only client the tests load exports with, in a
# venv of its own (it brings its own onnxruntime).
FASTEMBED_VENV ?= $(RUNS)/venv-fastembed
# (The stamp file is written last: an interrupted install is redone.)
$(FASTEMBED_VENV)/.installed:
	$(PYTHON) -m venv $(FASTEMBED_VENV)
	$(FASTEMBED_VENV)/bin/pip install -q "fastembed==0.9.1"
	touch $@

# torch (PyPI's build, large), transformers and sentence-transformers, which
# the tests load pruned directories with (tests/transformers_client.py), and
# llama.cpp's gguf package (tests/fixtures/make_gguf.py), in
# a venv of their own. It sees the system's packages, so a machine that
# already has these versions installs nothing.
TRANSFORMERS_VENV ?= $(RUNS)/venv-transformers
$(TRANSFORMERS_VENV)/.installed:
	$(PYTHON) -m venv --system-site-packages $(TRANSFORMERS_VENV)
	$(TRANSFORMERS_VENV)/bin/pip install -q "torch==2.15.0" "transformers==5.24.0" "sentence-transformers==6.2.0" "gguf==0.17.1" safetensors numpy
	touch $@

test: system-deps models onnxruntime $(FASTEMBED_VENV)/.installed $(TRANSFORMERS_VENV)/.installed
	EFFIR_MINILM_DIR=$(MINILM) EFFIR_FASTEMBED_PYTHON=$(FASTEMBED_VENV)/bin/python \
	  EFFIR_TRANSFORMERS_PYTHON=$(TRANSFORMERS_VENV)/bin/python cargo test --release --workspace

# The readers' fuzz targets for FUZZ_SECONDS in all (shared by the readers),
# from a random seed (FUZZ_SEED=N repeats one); an input that panics is
# saved under tests/fixtures/fuzz-regressions/, which every test run replays.
FUZZ_SECONDS ?= 600
fuzz:
	mkdir -p $(RUNS)
	EFFIR_FUZZ_SECONDS=$(FUZZ_SECONDS) $(if $(FUZZ_SEED),EFFIR_FUZZ_SEED=$(FUZZ_SEED)) \
	  cargo test --release --test test_fuzz -- --test-threads=1 --nocapture > $(RUNS)/fuzz.log 2>&1; \
	  status=$$?; grep -E "^fuzz |^test |panicked at tests|replayed|memory allocation|test result" $(RUNS)/fuzz.log; exit $$status

# ---- GGUF import (issue 17) -------------------------------------------------
# The causal LLMs on these machines come as GGUF files. `gguf-parity` imports
# each (`effir import-gguf`) and compares the directory with transformers' own
# GGUF loader: tokenizer ids, every dequantized weight, last hidden states
# on every token and effir's last-token embeddings of varied texts
# (benchmarks/gguf_parity.py). Reports: results/gguf/.
SMOLLM2_GGUF ?= $(MODELS)/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf
QWEN_GGUF    ?= $(MODELS)/qwen2.5-0.5b-gguf/model.gguf
SMOLLM2      ?= $(RUNS)/smollm2-135m
QWEN         ?= $(RUNS)/qwen2.5-0.5b

$(SMOLLM2_GGUF): | system-deps
	scripts/fetch-model.sh smollm2-gguf $(dir $@)

$(QWEN_GGUF): | system-deps
	scripts/fetch-model.sh qwen2.5-0.5b-gguf $(dir $@)

$(SMOLLM2)/config.json: $(SMOLLM2_GGUF) | build
	$(EFFIR) import-gguf --gguf $< --out $(SMOLLM2)

$(QWEN)/config.json: $(QWEN_GGUF) | build
	$(EFFIR) import-gguf --gguf $< --out $(QWEN)

gguf-parity: build $(TRANSFORMERS_VENV)/.installed $(SMOLLM2)/config.json $(QWEN)/config.json
	mkdir -p results/gguf
	set -e; for pair in "$(SMOLLM2) $(SMOLLM2_GGUF)" "$(QWEN) $(QWEN_GGUF)"; do \
	  set -- $$pair; name=$$(basename $$1); \
	  $(EFFIR) embed --model $$1 --input benchmarks/gguf_parity_texts.txt --output $(RUNS)/$$name-parity.npy; \
	  $(TRANSFORMERS_VENV)/bin/python benchmarks/gguf_parity.py --gguf $$2 --model $$1 \
	    --texts benchmarks/gguf_parity_texts.txt --embeddings $(RUNS)/$$name-parity.npy --out results/gguf/$$name-parity.json; \
	done

# SmolLM2-135M-Instruct made a causal, last-token retriever: the imported
# model with sentence-transformers files (configs/smollm2-retriever/: last-
# token pooling, normalisation, an instruction before each query), trained
# without labels first (smollm2-distill, below), then on SciFact train
# (configs/finetune-smollm2-retriever.yaml: InfoNCE with a
# BM25 hard negative, KL to all-MiniLM-L6-v2's scores), scored like the
# EmbeddingGemma runs: the $(SMOLLM2_SAMPLE)-document SciFact sample (every
# judged document plus random others, seed 0; SMOLLM2_SAMPLE= for the full
# corpus) and all of Cranfield (never trained on). Resumes when interrupted.
SMOLLM2_SAMPLE ?= 2000
SMOLLM2_RETRIEVER ?= $(RUNS)/smollm2-135m-retriever
# The imported SmolLM2 with the retriever's sentence-transformers files.
smollm2-st: $(SMOLLM2)/config.json
	test -d $(SMOLLM2)-st || { rm -rf $(SMOLLM2)-st.tmp && cp -r $(SMOLLM2) $(SMOLLM2)-st.tmp && \
	  cp -r configs/smollm2-retriever/. $(SMOLLM2)-st.tmp/ && mv $(SMOLLM2)-st.tmp $(SMOLLM2)-st; }

# Stage 1, label-free (configs/distill-smollm2-from-minilm.yaml): the
# imported model learns all-MiniLM-L6-v2's in-batch similarities on SciFact
# corpus text and the text of SciFact's train queries (--train-queries:
# written with the retriever's instruction, read bare by MiniLM; never their
# judgements), one epoch, scored like the retriever. About 2 hours on 2 cores.
SMOLLM2_DISTILLED ?= $(RUNS)/smollm2-135m-distill-minilm-queries
# $(call resumable_finetune,MODEL,OUT,FLAGS,CONFIG): `effir finetune` of MODEL
# into OUT unless OUT is done, resuming from OUT's checkpoints where a run
# was interrupted (one shell command; a failure exits the recipe line).
resumable_finetune = if [ ! -f $(2)/config.json ]; then \
  resume=; [ -d $(2).checkpoints ] && resume=--resume; \
  $(EFFIR) finetune --model $(1) $(3) --config $(4) --out $(2) $$resume || exit 1; \
  fi
smollm2-distill: build models smollm2-st
	$(call resumable_finetune,$(SMOLLM2)-st,$(SMOLLM2_DISTILLED),--train-texts $(DATA) --train-queries $(DATA),configs/distill-smollm2-from-minilm.yaml)
	test -f $(SMOLLM2_DISTILLED).heldout-eval/metrics.json || { $(call smollm2_eval,$(SMOLLM2_DISTILLED)); }

# Stage 2, labeled: the retriever recipe from the label-free stage.
smollm2-retriever: build smollm2-distill
	$(call resumable_finetune,$(SMOLLM2_DISTILLED),$(SMOLLM2_RETRIEVER),--train $(DATA) --hard-negatives $(DATA)/train_hard_negatives.jsonl.gz,configs/finetune-smollm2-retriever.yaml)
	$(EFFIR) eval --model $(SMOLLM2_RETRIEVER) --max-length 256 --data $(DATA) $(call sample_flag,$(SMOLLM2_SAMPLE)) \
	  --batch-size 16 --out $(SMOLLM2_RETRIEVER).eval
	$(EFFIR) eval --model $(SMOLLM2_RETRIEVER) --max-length 256 --data $(HELDOUT) --batch-size 16 --out $(SMOLLM2_RETRIEVER).heldout-eval

# The EffiR study on the causal, last-token retriever (issue 17), as on
# MiniLM and EmbeddingGemma: sub-layer importance; the zero-shot drop study
# (k attention against k MLP sub-layers of 30), calibrated and scored on
# the SciFact sample, then the same drops on Cranfield; the refit plans at
# 25/50/70 % (configs/prune-smollm2-*-refit.yaml), each scored, then
# recovered by label-free distillation from the retriever on SciFact corpus
# text (configs/recover-smollm2.yaml) and scored again. Hours on 2 cores.
# The analysis and drop study run on SMOLLM2_STUDY (the labeled retriever
# by default; `make drop-study-smollm2 SMOLLM2_STUDY=$(SMOLLM2_DISTILLED)`
# studies the label-free stage), into $(RUNS)/{analyze,drop-study}-NAME.
SMOLLM2_PLANS ?= 25-refit 50-refit 70-refit
SMOLLM2_STUDY ?= $(SMOLLM2_RETRIEVER)
smollm2_study_name = $(notdir $(SMOLLM2_STUDY))
# $(call smollm2_eval,MODEL): MODEL scored on the SciFact sample and on
# Cranfield, each skipped when its metrics are already there.
smollm2_eval = { test -f $(1).eval/metrics.json || \
  $(EFFIR) eval --model $(1) --max-length 256 --data $(DATA) $(call sample_flag,$(SMOLLM2_SAMPLE)) --batch-size 16 --out $(1).eval; } && \
  { test -f $(1).heldout-eval/metrics.json || \
  $(EFFIR) eval --model $(1) --max-length 256 --data $(HELDOUT) --batch-size 16 --out $(1).heldout-eval; }
drop-study-smollm2: build
	test -f $(SMOLLM2_STUDY)/config.json || { echo "$(SMOLLM2_STUDY): no model (make smollm2-retriever, or set SMOLLM2_STUDY)" >&2; exit 1; }
	$(EFFIR) analyze --model $(SMOLLM2_STUDY) --data $(DATA) --max-length 256 --calib-tokens 8192 --out $(RUNS)/analyze-$(smollm2_study_name)
	$(EFFIR) drop-study --model $(SMOLLM2_STUDY) --data $(DATA) --max-length 256 --k 2,4,8,12 --calib-tokens 8192 \
	  $(call sample_flag,$(SMOLLM2_SAMPLE)) --batch-size 16 --out $(RUNS)/drop-study-$(smollm2_study_name)
	$(EFFIR) drop-study --model $(SMOLLM2_STUDY) --data $(HELDOUT) --max-length 256 --k 2,4,8,12 \
	  --importance $(RUNS)/drop-study-$(smollm2_study_name)/importance.json --batch-size 16 --out $(RUNS)/drop-study-$(smollm2_study_name)-heldout

# The refit plans of the labeled retriever: every plan pruned and scored
# first (minutes each), then each recovered and scored again (about an hour
# each). Resumes: a pruned or recovered model or a score already there is
# kept.
prune-smollm2: build
	for p in $(SMOLLM2_PLANS); do \
	  m=$(RUNS)/smollm2-retriever-prune-$$p; \
	  test -f $$m/config.json || $(EFFIR) prune --model $(SMOLLM2_RETRIEVER) --max-length 256 --plan configs/prune-smollm2-$$p.yaml \
	    --data $(DATA) --calib-tokens 16384 --batch-size 16 --out $$m || exit 1; \
	  $(call smollm2_eval,$$m) || exit 1; \
	done
	for p in $(SMOLLM2_PLANS); do \
	  m=$(RUNS)/smollm2-retriever-prune-$$p; \
	  $(call resumable_finetune,$$m,$$m-distill,--train-texts $(DATA),configs/recover-smollm2.yaml); \
	  $(call smollm2_eval,$$m-distill) || exit 1; \
	done

results-smollm2: smollm2-retriever
	$(MAKE) drop-study-smollm2 SMOLLM2_STUDY=$(SMOLLM2_RETRIEVER)
	$(MAKE) prune-smollm2

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
	$(PYTHON) -c "import torch, transformers, sentence_transformers, datasets, accelerate" 2>/dev/null || \
	  $(PYTHON) -m pip install -q torch transformers sentence-transformers safetensors numpy datasets accelerate

fixtures: python-deps models
	$(PYTHON) tests/fixtures/make_reference.py --minilm $(MINILM)

# pytrec_eval's numbers for the committed run files, and sentence-transformers'
# retrieval scores that `effir eval` is checked against.
metric-references: python-deps models
	$(PYTHON) -c "import pytrec_eval" 2>/dev/null || $(PYTHON) -m pip install -q pytrec-eval-terrier
	$(PYTHON) tests/fixtures/eval/make_metric_reference.py
	$(PYTHON) benchmarks/reference_eval.py --model $(MINILM) --data data/cranfield --out tests/fixtures/eval/cranfield-minilm-st.json
	$(PYTHON) benchmarks/reference_eval.py --model $(MINILM) --data data/scifact --out tests/fixtures/eval/scifact-minilm-st.json

# Inference speed: effir (candle) vs sentence-transformers (PyTorch CPU) vs
# ONNX Runtime on effir's own export, interleaved, 2 threads each: MiniLM on
# 2,000 SciFact abstracts, EmbeddingGemma on 256 with its document prompt.
bench-embed: build models python-deps onnxruntime $(GEMMA)/model.safetensors
	$(EFFIR) export --model $(MINILM) --profile sentence-transformers --out $(RUNS)/onnx/minilm-st --overwrite
	$(PYTHON) benchmarks/embed_speed.py --model $(MINILM) --docs 2000 --repeats 3 --onnx $(RUNS)/onnx/minilm-st
	$(EFFIR) export --model $(GEMMA) --profile sentence-transformers --out $(RUNS)/onnx/embeddinggemma-st --overwrite
	$(PYTHON) benchmarks/embed_speed.py --model $(GEMMA) --docs 256 --repeats 3 --prompt document --onnx $(RUNS)/onnx/embeddinggemma-st

# Where an effir forward spends its time (perf samples by function).
profile-embed: build models
	benchmarks/profile_embed.sh $(MINILM)

# `effir analyze` seconds per 1,000 calibration tokens (median of 5 runs).
bench-analyze: build models
	$(PYTHON) benchmarks/analyze_speed.py --model $(MINILM) --tokens 16384 --repeats 5

parity-embeddinggemma: build $(GEMMA)/model.safetensors python-deps
	$(PYTHON) benchmarks/parity_embeddinggemma.py --model $(GEMMA)

# ---- ONNX (issue 5) --------------------------------------------------------
# Export, validate and benchmark all-MiniLM-L6-v2 and a 50 % MLP-pruned copy.
PROFILE ?= sentence-transformers
export: build models onnxruntime
	$(EFFIR) export --model $(MINILM) --profile $(PROFILE) --out $(RUNS)/onnx/minilm --overwrite

$(RUNS)/minilm-prune-50/config.json: | build models
	$(EFFIR) prune --model $(MINILM) --plan configs/prune-minilm-50.yaml --data $(DATA) --out $(RUNS)/minilm-prune-50

export-pruned: build onnxruntime $(RUNS)/minilm-prune-50/config.json
	$(EFFIR) export --model $(RUNS)/minilm-prune-50 --profile $(PROFILE) --out $(RUNS)/onnx/minilm-prune-50 --overwrite

# Gates of configs/gates.yaml on SciFact: the full export must pass; the
# pruned one (before fine-tuning) is expected to fail the quality gates.
validate: export
	$(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/onnx/minilm --data $(DATA) \
	  --gates configs/gates.yaml --out $(RUNS)/validate-minilm

validate-pruned: export-pruned
	-$(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/onnx/minilm-prune-50 --data $(DATA) \
	  --gates configs/gates.yaml --out $(RUNS)/validate-minilm-prune-50

# The pruned MiniLMs of `make prune-minilm` scored on the full SciFact corpus
# through ONNX Runtime (RESULTS.md); their quality gates are expected to fail.
validate-prune-minilm: build onnxruntime
	for p in 25 50 70; do \
	  $(EFFIR) export --model $(RUNS)/minilm-prune-$$p --out $(RUNS)/onnx/minilm-prune-$$p --overwrite || exit 1; \
	  $(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/onnx/minilm-prune-$$p --data $(DATA) \
	    --gates configs/gates.yaml --out $(RUNS)/validate-minilm-prune-$$p || echo "minilm-prune-$$p: gates failed (see its validation.md)"; \
	done

bench-onnx: export export-pruned
	$(EFFIR) bench --graph $(RUNS)/onnx/minilm --graph $(RUNS)/onnx/minilm-prune-50 \
	  --batch 1,32 --length 128,256 --runs 20 --out $(RUNS)/bench-onnx.json

# ---- fine-tuning (issue 6) -------------------------------------------------
# EffiR's recovery: the 50 % MLP-pruned MiniLM fine-tuned on SciFact train
# (hard negatives, distillation from the full model), evaluated on SciFact
# test; then the same recipe on the unpruned model.
# Scores come from `effir validate` (through ONNX Runtime, equal to candle's
# evaluation within 1e-4 as tests/test_validate.rs checks; 2.5x faster here):
# candidate nDCG@10 and its retention of the full model's.
# $(call finetune_and_validate,MODEL,CONFIG,NAME): fine-tune MODEL with CONFIG
# into $(RUNS)/NAME, export it, and validate it against the full model.
define finetune_and_validate
	rm -rf $(RUNS)/$(3) $(RUNS)/$(3).checkpoints
	$(EFFIR) finetune --model $(1) --train $(DATA) --hard-negatives $(DATA)/train_hard_negatives.jsonl.gz \
	  --config $(2) --out $(RUNS)/$(3)
	$(EFFIR) export --model $(RUNS)/$(3) --out $(RUNS)/onnx/$(3) --overwrite
	-$(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/onnx/$(3) --data $(DATA) --data $(HELDOUT) \
	  --gates configs/gates.yaml --out $(RUNS)/validate-$(3)
endef

finetune-minilm: build models onnxruntime $(RUNS)/minilm-prune-50/config.json
	$(call finetune_and_validate,$(RUNS)/minilm-prune-50,configs/finetune-minilm.yaml,minilm-prune-50-ft)

# The same recipe for two epochs at twice the learning rate.
finetune-minilm-2ep: build models onnxruntime $(RUNS)/minilm-prune-50/config.json
	$(call finetune_and_validate,$(RUNS)/minilm-prune-50,configs/finetune-minilm-2ep.yaml,minilm-prune-50-ft2ep)

finetune-minilm-unpruned: build models onnxruntime
	$(call finetune_and_validate,$(MINILM),configs/finetune-minilm.yaml,minilm-ft)

finetune-minilm-unpruned-2ep: build models onnxruntime
	$(call finetune_and_validate,$(MINILM),configs/finetune-minilm-2ep.yaml,minilm-ft2ep)

# ---- label-free recovery (issue 14) ----------------------------------------
# Each MiniLM plan (narrow-only with least-squares reconstruction, by
# default; RECOVER_PLANS=50 for the drop + narrow plan) pruned (if not yet),
# then recovered without labels: the
# student learns the full model's embeddings of the SciFact corpus text
# (configs/recover-minilm.yaml; no qrels, no queries), exported with the
# sentence-transformers profile and validated on SciFact test (whose corpus
# text it saw) and Cranfield (never seen). An interrupted run resumes from
# its checkpoints when the target is run again.
# $(call recover_plans,PLANS,SUFFIX,TEXT FLAGS,CONFIG): for each plan, its
# start (pruned when missing), distilled label-free into
# runs/minilm-prune-PLAN-SUFFIX (resuming from its checkpoints), exported with
# the sentence-transformers profile and validated on SciFact and Cranfield.
define recover_plans
	for p in $(1); do \
	  test -f $(RUNS)/minilm-prune-$$p/config.json || \
	    $(EFFIR) prune --model $(MINILM) --plan configs/prune-minilm-$$p.yaml --data $(DATA) --out $(RUNS)/minilm-prune-$$p || exit 1; \
	  name=minilm-prune-$$p-$(2); \
	  $(call resumable_finetune,$(RUNS)/minilm-prune-$$p,$(RUNS)/$$name,$(3),$(4)); \
	  $(EFFIR) export --model $(RUNS)/$$name --profile sentence-transformers --out $(RUNS)/onnx/$$name --overwrite || exit 1; \
	  $(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/onnx/$$name --data $(DATA) --data $(HELDOUT) \
	    --gates configs/gates.yaml --out $(RUNS)/validate-$$name \
	    || echo "$$name: gates failed (see its validation.md)"; \
	done
endef

RECOVER_PLANS ?= 25-refit 50-refit 70-refit
recover-minilm: build models onnxruntime
	$(call recover_plans,$(RECOVER_PLANS),distill,--train-texts $(DATA),configs/recover-minilm.yaml)

# A variant of the label-free recipe, RECOVER_VARIANT=NAME: the same text
# and plans with configs/recover-minilm-NAME.yaml (lr3e-5: a third of the
# learning rate; mlp-only: only the MLP sub-layers trained; 1ep: one epoch), into
# runs/minilm-prune-PLAN-distill-NAME (-seedS with RECOVER_SEED=S, not 0),
# scored like recover-minilm.
RECOVER_SEED ?= 0
SEED_SUFFIX = $(addprefix -seed,$(filter-out 0,$(RECOVER_SEED)))
VARIANT_PLANS ?= 50-refit
recover-minilm-variant: build models onnxruntime
	@test -n "$(RECOVER_VARIANT)" || { echo "recover-minilm-variant: set RECOVER_VARIANT=NAME (configs/recover-minilm-NAME.yaml)"; exit 2; }
	$(call recover_plans,$(VARIANT_PLANS),distill-$(RECOVER_VARIANT)$(SEED_SUFFIX),--train-texts $(DATA) --seed $(RECOVER_SEED),configs/recover-minilm-$(RECOVER_VARIANT).yaml)

# $(call int8_validate,NAME): runs/NAME exported as int8 (u8s8, plain and
# SmoothQuant-smoothed as the frontier exports it) and each validated like
# the fp32 export, into runs/validate-NAME-int8[-smooth].
define int8_validate
	for v in int8:"--precision int8 --int8-kernel u8s8" int8-smooth:"$(SMOOTHED_INT8)"; do \
	  $(EFFIR) export --model $(RUNS)/$(1) --profile sentence-transformers $${v#*:} --out $(RUNS)/onnx/$(1)-$${v%%:*} --overwrite || exit 1; \
	  $(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/onnx/$(1)-$${v%%:*} --data $(DATA) --data $(HELDOUT) \
	    --gates configs/gates.yaml --out $(RUNS)/validate-$(1)-$${v%%:*} || echo "$(1)-$${v%%:*}: gates failed (see its validation.md)"; \
	done
endef

# int8 exports of any MiniLM model under runs/ (NAME=...), validated as
# int8_validate does.
int8-validate-minilm: build onnxruntime
	@test -n "$(NAME)" || { echo "int8-validate-minilm: set NAME=DIR (a model under $(RUNS)/)"; exit 2; }
	$(call int8_validate,$(NAME))

# Gradual label-free recovery of the 50 % plan: the 25 % plan
# (configs/prune-minilm-25-refit.yaml) distilled for one epoch, narrowed
# again to half the full model's MLP neurons and reconstructed
# (configs/prune-minilm-50-from-25.yaml), then distilled for one more epoch
# (configs/recover-minilm-1ep.yaml): the same two epochs of the full model's
# embeddings of SciFact corpus text as recover-minilm's one-shot 50 % run,
# into runs/minilm-prune-50-gradual-distill-1ep, scored like it, and as int8
# (int8_validate).
# RECOVER_SEED=S (not 0) runs both stages with --seed S, into names ending
# -seedS.
GRADUAL_25 = minilm-prune-25-refit-distill-1ep$(SEED_SUFFIX)
recover-minilm-gradual: build models onnxruntime
	test -f $(RUNS)/minilm-prune-25-refit/config.json || \
	  $(EFFIR) prune --model $(MINILM) --plan configs/prune-minilm-25-refit.yaml --data $(DATA) --out $(RUNS)/minilm-prune-25-refit
	$(call resumable_finetune,$(RUNS)/minilm-prune-25-refit,$(RUNS)/$(GRADUAL_25),--train-texts $(DATA) --seed $(RECOVER_SEED),configs/recover-minilm-1ep.yaml)
	test -f $(RUNS)/minilm-prune-50-gradual$(SEED_SUFFIX)/config.json || \
	  $(EFFIR) prune --model $(RUNS)/$(GRADUAL_25) --plan configs/prune-minilm-50-from-25.yaml --data $(DATA) \
	    --out $(RUNS)/minilm-prune-50-gradual$(SEED_SUFFIX)
	$(call recover_plans,50-gradual$(SEED_SUFFIX),distill-1ep,--train-texts $(DATA) --seed $(RECOVER_SEED),configs/recover-minilm-1ep.yaml)
	$(call int8_validate,minilm-prune-50-gradual$(SEED_SUFFIX)-distill-1ep)

# The same carried one stage further, to the 70 % plan: the gradual 50 %
# model narrowed again to 30 % of the full model's MLP neurons and
# reconstructed (configs/prune-minilm-70-from-50.yaml), distilled for a third
# epoch, into runs/minilm-prune-70-gradual-distill-1ep (three epochs in all,
# one more than recover-minilm's one-shot 70 % run).
recover-minilm-gradual-70: recover-minilm-gradual
	test -f $(RUNS)/minilm-prune-70-gradual$(SEED_SUFFIX)/config.json || \
	  $(EFFIR) prune --model $(RUNS)/minilm-prune-50-gradual$(SEED_SUFFIX)-distill-1ep --plan configs/prune-minilm-70-from-50.yaml \
	    --data $(DATA) --out $(RUNS)/minilm-prune-70-gradual$(SEED_SUFFIX)
	$(call recover_plans,70-gradual$(SEED_SUFFIX),distill-1ep,--train-texts $(DATA) --seed $(RECOVER_SEED),configs/recover-minilm-1ep.yaml)
	$(call int8_validate,minilm-prune-70-gradual$(SEED_SUFFIX)-distill-1ep)

# Issue 14's combined target from the gradual start: the gradual 50 % model
# (label-free) given a light labeled stage
# (configs/finetune-minilm-combined-light.yaml: the combined recipe for one
# epoch at a fifth of its learning rate) on SciFact train, into
# runs/minilm-prune-50-gradual-distill-1ep-combined-light (-seedS), scored
# like recover-minilm (SciFact test in-domain, Cranfield held out), and as
# int8 (int8_validate).
GRADUAL_COMBINED = minilm-prune-50-gradual$(SEED_SUFFIX)-distill-1ep-combined-light
recover-minilm-gradual-combined: build models onnxruntime
	test -f $(RUNS)/minilm-prune-50-gradual$(SEED_SUFFIX)-distill-1ep/config.json || $(MAKE) recover-minilm-gradual
	$(call recover_plans,50-gradual$(SEED_SUFFIX)-distill-1ep,combined-light,--train $(DATA) \
	  --hard-negatives $(DATA)/train_hard_negatives.jsonl.gz --seed $(RECOVER_SEED),configs/finetune-minilm-combined-light.yaml)
	$(call int8_validate,$(GRADUAL_COMBINED))

# The same light stage replaying the label-free recipe's text
# (configs/finetune-minilm-combined-light-replay.yaml: 32 SciFact corpus
# texts, --train-texts, beside each labeled batch, with the label-free terms
# on them too), into
# runs/minilm-prune-50-gradual-distill-1ep-combined-light-replay (-seedS),
# scored the same way.
GRADUAL_REPLAY = minilm-prune-50-gradual$(SEED_SUFFIX)-distill-1ep-combined-light-replay
recover-minilm-gradual-combined-replay: build models onnxruntime
	test -f $(RUNS)/minilm-prune-50-gradual$(SEED_SUFFIX)-distill-1ep/config.json || $(MAKE) recover-minilm-gradual
	$(call recover_plans,50-gradual$(SEED_SUFFIX)-distill-1ep,combined-light-replay,--train $(DATA) \
	  --hard-negatives $(DATA)/train_hard_negatives.jsonl.gz --train-texts $(DATA) --seed $(RECOVER_SEED),configs/finetune-minilm-combined-light-replay.yaml)
	$(call int8_validate,$(GRADUAL_REPLAY))

# Speed of the gradual 50 % model's int8 graphs against effir's fp32 export
# of the full model, the full model's smoothed int8 graph and the 25 %
# reconstructed plan's (the fastest point that passed before), and the
# gradual 70 % model's: one interleaved `effir bench` at batch 32 x 256
# (needs recover-minilm-gradual-70).
bench-gradual: build models onnxruntime
	$(EFFIR) export --model $(MINILM) --profile sentence-transformers --out $(RUNS)/onnx/minilm-fp32 --overwrite
	$(EFFIR) export --model $(MINILM) --profile sentence-transformers $(SMOOTHED_INT8) --out $(RUNS)/onnx/minilm-int8-smooth --overwrite
	$(call int8_validate,minilm-prune-25-refit)
	$(EFFIR) bench --graph $(RUNS)/onnx/minilm-fp32 --graph $(RUNS)/onnx/minilm-int8-smooth \
	  --graph $(RUNS)/onnx/minilm-prune-25-refit-int8-smooth --graph $(RUNS)/onnx/minilm-prune-50-gradual-distill-1ep-int8 \
	  --graph $(RUNS)/onnx/minilm-prune-50-gradual-distill-1ep-int8-smooth \
	  --graph $(RUNS)/onnx/minilm-prune-70-gradual-distill-1ep-int8-smooth --batch 32 --length 256 --runs 10 \
	  --out results/minilm/recover/gradual/bench.json

# The label-free recipe's spread across seeds: the seed orders the texts, and
# so decides which share a batch (the similarity term compares each with its
# batch). SEED_PLANS distilled again with each of RECOVER_SEEDS (seed 0 is
# recover-minilm's run) into runs/minilm-prune-PLAN-distill-seedS, each
# exported and validated as recover-minilm does.
SEED_PLANS ?= 50-refit
RECOVER_SEEDS ?= 1 2
recover-minilm-seeds: build models onnxruntime
	for s in $(RECOVER_SEEDS); do \
	  $(call recover_plans,$(SEED_PLANS),distill-seed$$s,--train-texts $(DATA) --seed $$s,configs/recover-minilm.yaml); \
	done

# The label-free recipe with the token term (configs/recover-minilm-tokens.yaml):
# the student also learns the teacher's last hidden state of every token.
# Same text (SciFact corpus), same plans' starts, scored like recover-minilm.
TOKEN_PLANS ?= 50-refit 70-refit
recover-minilm-tokens: build models onnxruntime
	$(call recover_plans,$(TOKEN_PLANS),distill-tokens,--train-texts $(DATA),configs/recover-minilm-tokens.yaml)

# The label-free recipe on SciFact corpus text plus the text of SciFact's
# train queries (never their judgements): the student also learns the
# teacher's embeddings of query-like text. Scored like recover-minilm.
# (MiniLM has no query prompt, so the query text is the same read as
# documents; the runs predate --train-queries and keep their command.)
$(RUNS)/scifact-train-queries.jsonl:
	$(PYTHON) scripts/beir-query-texts.py $(DATA) train $@

QUERY_TEXT_PLANS ?= 50-refit 70-refit
recover-minilm-query-text: build models onnxruntime $(RUNS)/scifact-train-queries.jsonl
	$(call recover_plans,$(QUERY_TEXT_PLANS),distill-queries,--train-texts $(DATA) --train-texts $(RUNS)/scifact-train-queries.jsonl,configs/recover-minilm.yaml)

# The label-free recipe on SciFact corpus text plus SPANS_PER_DOCUMENT random
# spans of 1-3 consecutive sentences of each abstract
# (scripts/beir-corpus-spans.py, seed 0): Contriever-style crops,
# query-length text from the same corpus, no queries, no judgements. Into
# runs/minilm-prune-PLAN-distill-spans (one span a document) or
# -distill-spansN; RECOVER_SEED=S (not 0) adds -seedS. Scored like
# recover-minilm.
SPANS_PER_DOCUMENT ?= 1
$(RUNS)/scifact-corpus-spans-%.jsonl:
	$(PYTHON) scripts/beir-corpus-spans.py $(DATA) $@ --per-document $*

SPAN_PLANS ?= 50-refit
SPAN_RUN = distill-spans$(filter-out 1,$(SPANS_PER_DOCUMENT))$(SEED_SUFFIX)
recover-minilm-spans: build models onnxruntime $(RUNS)/scifact-corpus-spans-$(SPANS_PER_DOCUMENT).jsonl
	$(call recover_plans,$(SPAN_PLANS),$(SPAN_RUN),--train-texts $(DATA) --train-texts $(RUNS)/scifact-corpus-spans-$(SPANS_PER_DOCUMENT).jsonl --seed $(RECOVER_SEED),configs/recover-minilm.yaml)

# The labeled SciFact recipe (configs/finetune-minilm-2ep.yaml) and the same
# combined with label-free embedding distillation
# (configs/finetune-minilm-combined.yaml) on the refit plans, each exported
# (fp32 and int8 u8s8) and validated on SciFact test (tuned on its train
# split) and Cranfield (held out). Resumes when interrupted.
LABELED_PLANS ?= 50-refit
recover-minilm-labeled: build models onnxruntime
	for p in $(LABELED_PLANS); do \
	  test -f $(RUNS)/minilm-prune-$$p/config.json || \
	    $(EFFIR) prune --model $(MINILM) --plan configs/prune-minilm-$$p.yaml --data $(DATA) --out $(RUNS)/minilm-prune-$$p || exit 1; \
	  for recipe in ft2ep:finetune-minilm-2ep combined:finetune-minilm-combined; do \
	    name=minilm-prune-$$p-$${recipe%%:*}; \
	    $(call resumable_finetune,$(RUNS)/minilm-prune-$$p,$(RUNS)/$$name,--train $(DATA) --hard-negatives $(DATA)/train_hard_negatives.jsonl.gz,configs/$${recipe#*:}.yaml); \
	    $(EFFIR) export --model $(RUNS)/$$name --profile sentence-transformers --out $(RUNS)/onnx/$$name --overwrite || exit 1; \
	    $(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/onnx/$$name --data $(DATA) --data $(HELDOUT) \
	      --gates configs/gates.yaml --out $(RUNS)/validate-$$name || echo "$$name: gates failed (see its validation.md)"; \
	    $(EFFIR) export --model $(RUNS)/$$name --profile sentence-transformers --precision int8 --int8-kernel u8s8 \
	      --out $(RUNS)/onnx/$$name-int8 --overwrite || exit 1; \
	    $(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/onnx/$$name-int8 --data $(DATA) --data $(HELDOUT) \
	      --gates configs/gates.yaml --out $(RUNS)/validate-$$name-int8 || echo "$$name-int8: gates failed (see its validation.md)"; \
	  done; \
	done

# Sharded corpus encoding of SciFact (issue 18): three local `effir encode`
# processes, one killed and resumed, merged by `effir eval --embeddings`,
# against a single `effir eval` (benchmarks/shard_scifact.sh).
shard-scifact: build models
	benchmarks/shard_scifact.sh $(EFFIR) $(MINILM) $(DATA) $(RUNS)/shard-scifact | tee results/minilm/shard-scifact.txt

# Paper scale on this machine (issue #18): random-weight Mistral-7B / Llama-3B
# shapes in bf16, analyzed, pruned (drop 8 MLPs, narrow the rest to 50 %)
# and exported (fp16 weights, external data) one layer at a time, each stage
# under /usr/bin/time -v; scale-3b also checks candle against ONNX Runtime.
# Needs ~35 GB of disk for 7B (model, pruned model, graph) and ~20 GB for 3B.
scale-7b: build $(TRANSFORMERS_VENV)/.installed
	cargo build --release --example synthetic_model
	EFFIR=$(EFFIR) DATA=$(DATA) benchmarks/scale.sh mistral-7b

scale-3b: build $(TRANSFORMERS_VENV)/.installed
	cargo build --release --example synthetic_model
	EFFIR=$(EFFIR) DATA=$(DATA) benchmarks/scale.sh llama-3b validate

# Training examples/s of effir vs sentence-transformers' trainer (PyTorch CPU), same model, batch and length.
bench-finetune: build models python-deps
	$(PYTHON) benchmarks/finetune_speed.py --model $(MINILM) --batch-size 16 --max-length 256 --steps 4 --rounds 3 \
	  | tee results/speed/finetune-minilm.txt

# Peak memory and step time of decoder training without and with gradient
# checkpointing (the SmolLM2 retriever recipe, 48 texts of 256 tokens a
# micro-batch), taking turns in one run. About 15 minutes on 2 cores, and
# 21 GB of memory for the run without.
TRAINING_MEMORY_STEPS ?= 3
TRAINING_MEMORY_ROUNDS ?= 1
bench-training-memory: build
	$(MAKE) smollm2-st
	benchmarks/training_memory.sh $(EFFIR) $(SMOLLM2)-st configs/finetune-smollm2-retriever.yaml $(DATA) \
	  $(TRAINING_MEMORY_STEPS) $(TRAINING_MEMORY_ROUNDS) --hard-negatives $(DATA)/train_hard_negatives.jsonl.gz \
	  | tee results/speed/training-memory-smollm2.md

profile-finetune: build models python-deps
	benchmarks/profile_finetune.sh $(MINILM) 4 | tee results/speed/profile-finetune-minilm.txt

# ---- rewrite (issue 7) ------------------------------------------------------
# Optimum (optimum-onnx pins transformers < 4.58) lives in its own virtual
# environment, beside the system's transformers 5 that the references use.
OPTIMUM_VENV ?= $(RUNS)/venv-optimum
$(OPTIMUM_VENV)/bin/optimum-cli:
	$(PYTHON) -m venv --system-site-packages $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install -q "optimum-onnx" "transformers<4.58" "huggingface-hub<1.0" "sentence-transformers<6" "datasets<4" httpx

# The committed Optimum exports of the tiny fixtures (tests/test_rewrite.rs).
optimum-fixtures: $(OPTIMUM_VENV)/bin/optimum-cli
	for m in bert llama qwen2; do \
	  $(OPTIMUM_VENV)/bin/python tests/fixtures/optimum/make_exports.py --model tests/fixtures/$$m --out tests/fixtures/optimum/$$m || exit 1; \
	done
	# Its sentence-transformers modules are newer than the venv's: the transformer alone.
	$(OPTIMUM_VENV)/bin/python tests/fixtures/optimum/make_exports.py --model tests/fixtures/gemma3 \
	  --out tests/fixtures/optimum/gemma3 --library-name transformers

# all-MiniLM-L6-v2 exported by Optimum, rewritten for the 50 % pruned model,
# validated on SciFact and benchmarked beside the original export.
rewrite-minilm: build models onnxruntime $(OPTIMUM_VENV)/bin/optimum-cli $(RUNS)/minilm-prune-50/config.json
	$(OPTIMUM_VENV)/bin/python tests/fixtures/optimum/make_exports.py --model $(MINILM) --out $(RUNS)/optimum/minilm
	rm -rf $(RUNS)/optimum/minilm-prune-50
	$(EFFIR) rewrite --onnx $(RUNS)/optimum/minilm/model.onnx --model $(RUNS)/minilm-prune-50 --out $(RUNS)/optimum/minilm-prune-50
	-$(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/optimum/minilm-prune-50 --candidate-model $(RUNS)/minilm-prune-50 --data $(DATA) \
	  --gates configs/gates.yaml --out $(RUNS)/validate-optimum-minilm-prune-50
	$(EFFIR) bench --graph $(RUNS)/optimum/minilm/model.onnx --graph $(RUNS)/optimum/minilm-prune-50/model.onnx \
	  --batch 1,32 --length 128,256 --runs 20 --out $(RUNS)/bench-rewrite.json
	# The same for the fine-tuned pruned model, when `make finetune-minilm` has made it.
	-if [ -d $(RUNS)/minilm-prune-50-ft ]; then \
	  rm -rf $(RUNS)/optimum/minilm-prune-50-ft; \
	  $(EFFIR) rewrite --onnx $(RUNS)/optimum/minilm/model.onnx --model $(RUNS)/minilm-prune-50-ft --out $(RUNS)/optimum/minilm-prune-50-ft && \
	  $(EFFIR) validate --reference $(MINILM) --candidate $(RUNS)/optimum/minilm-prune-50-ft --candidate-model $(RUNS)/minilm-prune-50-ft \
	    --data $(DATA) --gates configs/gates.yaml --out $(RUNS)/validate-optimum-minilm-prune-50-ft; \
	fi

# ---- the speed/quality frontier (issue 13) ----------------------------------
# Every MiniLM point as fp32 and int8 (kernels u8s8, u8u8 and reduce-range, and u8s8 smoothed with
# strength INT8_SMOOTHING, calibrated on $(DATA)'s text): the full model and each
# pruned or recovered model of FRONTIER_MODELS that exists under $(RUNS) (made
# by prune-minilm, prune-minilm-narrow, recover-minilm, finetune-minilm,
# recover-minilm-gradual(-70, -combined); a
# missing one is named and skipped), beside Optimum's fp32 export and its two
# int8 presets; all validated on SciFact test and Cranfield, timed in one
# interleaved run (batch 32 x 256 throughput, 1 x 32 latency).
FRONTIER_MODELS ?= minilm-prune-50-narrow minilm-prune-50-narrow-distill minilm-prune-25-refit minilm-prune-50-refit \
  minilm-prune-70-refit minilm-prune-25-refit-distill minilm-prune-50-refit-distill minilm-prune-70-refit-distill minilm-prune-25 minilm-prune-50 minilm-prune-70 \
  minilm-prune-25-distill minilm-prune-50-distill minilm-prune-70-distill minilm-prune-50-ft \
  minilm-prune-50-gradual-distill-1ep minilm-prune-70-gradual-distill-1ep minilm-prune-50-gradual-distill-1ep-combined-light
FRONTIER_OUT ?= results/minilm/frontier
FRONTIER_RUNS ?= 10
INT8_SMOOTHING ?= 0.75
INT8_SMOOTHING_FLAGS = --int8-smoothing $(INT8_SMOOTHING) --calib-data $(DATA)
SMOOTHED_INT8 = --precision int8 --int8-kernel u8s8 $(INT8_SMOOTHING_FLAGS)
# Optimum's three MiniLM exports (benchmarks/optimum_peers.py), its fp32 one
# the baseline speed-ups are measured against.
OPTIMUM_PEERS = --peer $(RUNS)/frontier/peers/optimum-fp32 --peer $(RUNS)/frontier/peers/optimum-int8-avx2 \
  --peer $(RUNS)/frontier/peers/optimum-int8-avx512-vnni --baseline optimum-fp32
frontier-minilm: build models onnxruntime $(OPTIMUM_VENV)/bin/optimum-cli
	$(OPTIMUM_VENV)/bin/python benchmarks/optimum_peers.py --model $(MINILM) --out $(RUNS)/frontier/peers
	set -e; points="--candidate full-fp32=$(RUNS)/frontier/full-fp32"; \
	$(EFFIR) export --model $(MINILM) --profile sentence-transformers --out $(RUNS)/frontier/full-fp32 --overwrite; \
	for k in u8s8 u8u8 reduce-range; do \
	  $(EFFIR) export --model $(MINILM) --profile sentence-transformers --precision int8 --int8-kernel $$k \
	    --out $(RUNS)/frontier/full-int8-$$k --overwrite; \
	  points="$$points --candidate full-int8-$$k=$(RUNS)/frontier/full-int8-$$k"; \
	done; \
	$(EFFIR) export --model $(MINILM) --profile sentence-transformers $(SMOOTHED_INT8) \
	  --out $(RUNS)/frontier/full-int8-u8s8-smooth --overwrite; \
	points="$$points --candidate full-int8-u8s8-smooth=$(RUNS)/frontier/full-int8-u8s8-smooth"; \
	for m in $(FRONTIER_MODELS); do \
	  if [ ! -f $(RUNS)/$$m/config.json ]; then echo "frontier: $(RUNS)/$$m not built, skipped"; continue; fi; \
	  $(EFFIR) export --model $(RUNS)/$$m --profile sentence-transformers --out $(RUNS)/frontier/$$m-fp32 --overwrite; \
	  points="$$points --candidate $$m-fp32=$(RUNS)/frontier/$$m-fp32"; \
	  for k in u8s8 u8u8 reduce-range; do \
	    $(EFFIR) export --model $(RUNS)/$$m --profile sentence-transformers --precision int8 --int8-kernel $$k \
	      --out $(RUNS)/frontier/$$m-int8-$$k --overwrite; \
	    points="$$points --candidate $$m-int8-$$k=$(RUNS)/frontier/$$m-int8-$$k"; \
	  done; \
	  $(EFFIR) export --model $(RUNS)/$$m --profile sentence-transformers $(SMOOTHED_INT8) \
	    --out $(RUNS)/frontier/$$m-int8-u8s8-smooth --overwrite; \
	  points="$$points --candidate $$m-int8-u8s8-smooth=$(RUNS)/frontier/$$m-int8-u8s8-smooth"; \
	done; \
	$(EFFIR) frontier --reference $(MINILM) $$points $(OPTIMUM_PEERS) \
	  --data $(DATA) --data $(HELDOUT) --gates configs/gates.yaml --runs $(FRONTIER_RUNS) --out $(FRONTIER_OUT)

# The part of frontier-minilm that decides the issue's target, in minutes
# rather than hours: the full model (fp32, int8 u8s8 plain and smoothed,
# reduce-range), the gradual 50 % model (fp32, u8s8 and reduce-range, each
# plain and smoothed; reduce-range is the kernel that cannot saturate on x86
# without VNNI), the gradual 70 % model and the light combined stage
# (smoothed int8), beside Optimum's three peers; validated on
# SciFact and Cranfield and timed in one interleaved run. The gradual 50 %
# model comes from recover-minilm-gradual, the 70 % one from
# recover-minilm-gradual-70, the combined stage from
# recover-minilm-gradual-combined; a point whose model is missing is named
# and left out.
FRONTIER_GRADUAL_OUT ?= results/minilm/frontier-gradual
GRADUAL_50 = $(RUNS)/minilm-prune-50-gradual-distill-1ep
INT8_U8S8 = --precision int8 --int8-kernel u8s8
# The fast kernel with 7-bit weights, which cannot saturate without VNNI.
INT8_REDUCE_RANGE = --precision int8 --int8-kernel reduce-range
SMOOTHED_REDUCE_RANGE = $(INT8_REDUCE_RANGE) $(INT8_SMOOTHING_FLAGS)
# $(call gradual_point,NAME,MODEL,EXPORT FLAGS): MODEL exported into
# runs/frontier-gradual/NAME and added to the shell's $$points (named and
# skipped when MODEL is missing).
gradual_point = if [ -f $(2)/config.json ]; then \
  $(EFFIR) export --model $(2) --profile sentence-transformers $(3) --out $(RUNS)/frontier-gradual/$(1) --overwrite; \
  points="$$points --candidate $(1)=$(RUNS)/frontier-gradual/$(1)"; \
  else echo "frontier-minilm-gradual: $(1) left out, no model at $(2)" >&2; fi;
frontier-minilm-gradual: build models onnxruntime $(OPTIMUM_VENV)/bin/optimum-cli
	test -f $(RUNS)/frontier/peers/optimum-int8-avx512-vnni/model.onnx || \
	  $(OPTIMUM_VENV)/bin/python benchmarks/optimum_peers.py --model $(MINILM) --out $(RUNS)/frontier/peers
	set -e; points=; \
	$(call gradual_point,full-fp32,$(MINILM),) \
	$(call gradual_point,full-int8-u8s8,$(MINILM),$(INT8_U8S8)) \
	$(call gradual_point,full-int8-u8s8-smooth,$(MINILM),$(SMOOTHED_INT8)) \
	$(call gradual_point,gradual50-fp32,$(GRADUAL_50),) \
	$(call gradual_point,gradual50-int8-u8s8,$(GRADUAL_50),$(INT8_U8S8)) \
	$(call gradual_point,gradual50-int8-u8s8-smooth,$(GRADUAL_50),$(SMOOTHED_INT8)) \
	$(call gradual_point,full-int8-reduce-range,$(MINILM),$(INT8_REDUCE_RANGE)) \
	$(call gradual_point,gradual50-int8-reduce-range,$(GRADUAL_50),$(INT8_REDUCE_RANGE)) \
	$(call gradual_point,gradual50-int8-reduce-range-smooth,$(GRADUAL_50),$(SMOOTHED_REDUCE_RANGE)) \
	$(call gradual_point,gradual70-int8-u8s8-smooth,$(RUNS)/minilm-prune-70-gradual-distill-1ep,$(SMOOTHED_INT8)) \
	$(call gradual_point,gradual50-combined-light-int8-u8s8-smooth,$(GRADUAL_50)-combined-light,$(SMOOTHED_INT8)) \
	$(EFFIR) frontier --reference $(MINILM) $$points $(OPTIMUM_PEERS) \
	  --data $(DATA) --data $(HELDOUT) --gates configs/gates.yaml --runs $(FRONTIER_RUNS) --out $(FRONTIER_GRADUAL_OUT)

# The EmbeddingGemma frontier (issue 13): the full model and every pruned
# plan of GEMMA_FRONTIER_MODELS that exists under $(RUNS) (made by
# prune-embeddinggemma, prune-embeddinggemma-refit, recover-embeddinggemma; a
# missing one is named and skipped), each as fp32 and int8 (u8s8, plain and
# smoothed), plus the
# full model as fp16 (range-checked; its parity measured on the CPU, where
# ONNX Runtime computes float16 products in float32). Scored on the
# $(GEMMA_SAMPLE)-document SciFact sample and Cranfield, timed in one
# interleaved run. No Optimum peers: optimum_peers.py exports BERT models.
# About 3 hours on 2 cores.
GEMMA_FRONTIER_MODELS ?= embeddinggemma-prune-25-refit embeddinggemma-prune-50-refit embeddinggemma-prune-25 \
  embeddinggemma-prune-50 embeddinggemma-prune-70 embeddinggemma-prune-25-refit-distill embeddinggemma-prune-50-refit-distill
GEMMA_FRONTIER_OUT ?= results/embeddinggemma/frontier
frontier-embeddinggemma: build onnxruntime $(GEMMA)/model.safetensors
	set -e; points=""; \
	$(EFFIR) export --model $(GEMMA) --profile sentence-transformers --out $(RUNS)/frontier-gemma/full-fp32 --overwrite; \
	$(EFFIR) export --model $(GEMMA) --profile sentence-transformers --precision fp16 --calib-data $(DATA) --calib-tokens 8192 \
	  --out $(RUNS)/frontier-gemma/full-fp16 --overwrite; \
	points="--candidate full-fp32=$(RUNS)/frontier-gemma/full-fp32 --candidate full-fp16=$(RUNS)/frontier-gemma/full-fp16"; \
	for m in full $(GEMMA_FRONTIER_MODELS); do \
	  src=$(RUNS)/$$m; [ $$m = full ] && src=$(GEMMA); \
	  if [ ! -f $$src/config.json ]; then echo "frontier: $$src not built, skipped"; continue; fi; \
	  if [ $$m != full ]; then \
	    $(EFFIR) export --model $$src --profile sentence-transformers --out $(RUNS)/frontier-gemma/$$m-fp32 --overwrite; \
	    points="$$points --candidate $$m-fp32=$(RUNS)/frontier-gemma/$$m-fp32"; \
	  fi; \
	  $(EFFIR) export --model $$src --profile sentence-transformers --precision int8 --int8-kernel u8s8 \
	    --out $(RUNS)/frontier-gemma/$$m-int8-u8s8 --overwrite; \
	  points="$$points --candidate $$m-int8-u8s8=$(RUNS)/frontier-gemma/$$m-int8-u8s8"; \
	  $(EFFIR) export --model $$src --profile sentence-transformers $(SMOOTHED_INT8) \
	    --out $(RUNS)/frontier-gemma/$$m-int8-u8s8-smooth --overwrite; \
	  points="$$points --candidate $$m-int8-u8s8-smooth=$(RUNS)/frontier-gemma/$$m-int8-u8s8-smooth"; \
	done; \
	$(EFFIR) frontier --reference $(GEMMA) $$points --baseline full-fp32 --data $(DATA) --data $(HELDOUT) \
	  $(call sample_flag,$(GEMMA_SAMPLE)) --max-length 256 --gates configs/gates.yaml --runs 5 --out $(GEMMA_FRONTIER_OUT)

# fp16 and TensorRT's QDQ int8 checked on the CPU (issue 13): each graph
# exported with calibration on SciFact and its parity with the model in
# candle measured by `effir validate` (parity gates only); the fp16
# arithmetic also emulated in PyTorch (benchmarks/fp16_emulation.py), since
# ONNX Runtime's CPU provider runs float16 MatMuls in float32. Reports in
# results/<model>/precision/.
PRECISION_GATES = configs/gates-parity.yaml
precision_validate = $(EFFIR) validate --reference $(1) --candidate $(RUNS)/precision/$(2) --data $(DATA) \
  --gates $(PRECISION_GATES) --parity-texts $(3) --max-length 256 --batch-size 8 --out results/$(4)/precision/$(2)
precision-checks: build models onnxruntime python-deps $(GEMMA)/model.safetensors
	mkdir -p results/minilm/precision results/embeddinggemma/precision
	$(EFFIR) export --model $(MINILM) --profile sentence-transformers --precision fp16 --calib-data $(DATA) \
	  --out $(RUNS)/precision/minilm-fp16 --overwrite
	$(EFFIR) export --model $(MINILM) --profile sentence-transformers --target tensorrt --precision int8 --calib-data $(DATA) \
	  --out $(RUNS)/precision/minilm-qdq --overwrite
	$(EFFIR) export --model $(MINILM) --profile sentence-transformers --target tensorrt --precision int8 --calib-data $(DATA) \
	  --qdq-all-products --out $(RUNS)/precision/minilm-qdq-all --overwrite
	$(EFFIR) export --model $(GEMMA) --profile sentence-transformers --precision fp16 --calib-data $(DATA) --calib-tokens 8192 \
	  --out $(RUNS)/precision/embeddinggemma-fp16 --overwrite
	-$(call precision_validate,$(MINILM),minilm-fp16,256,minilm)
	-$(call precision_validate,$(MINILM),minilm-qdq,256,minilm)
	-$(call precision_validate,$(MINILM),minilm-qdq-all,256,minilm)
	-$(call precision_validate,$(GEMMA),embeddinggemma-fp16,64,embeddinggemma)
	$(PYTHON) benchmarks/fp16_emulation.py --model $(MINILM) --data $(DATA) --texts 256 > results/minilm/precision/fp16-emulation.json
	$(PYTHON) benchmarks/fp16_emulation.py --model $(GEMMA) --data $(DATA) --texts 128 --batch-size 8 > results/embeddinggemma/precision/fp16-emulation.json
	for d in $(RUNS)/precision/*/; do cp $$d/effir_export.json results/$$(case $$d in *gemma*) echo embeddinggemma;; *) echo minilm;; esac)/precision/$$(basename $$d)-export.json; done

# The narrow-only 50 % plan (every MLP kept, each narrowed).
prune-minilm-narrow: build models
	rm -rf $(RUNS)/minilm-prune-50-narrow
	$(EFFIR) prune --model $(MINILM) --plan configs/prune-minilm-50-narrow.yaml --data $(DATA) --out $(RUNS)/minilm-prune-50-narrow

# The narrow-only plans with least-squares reconstruction (no training),
# scored on SciFact test and Cranfield: recover-minilm's starting points.
REFIT_PLANS ?= 25-refit 50-refit 70-refit
prune-minilm-refit: build models
	for p in $(REFIT_PLANS); do \
	  rm -rf $(RUNS)/minilm-prune-$$p; \
	  $(EFFIR) prune --model $(MINILM) --plan configs/prune-minilm-$$p.yaml --data $(DATA) --out $(RUNS)/minilm-prune-$$p || exit 1; \
	  $(EFFIR) eval --model $(RUNS)/minilm-prune-$$p --data $(DATA) --out $(RUNS)/minilm-prune-$$p.eval || exit 1; \
	  $(EFFIR) eval --model $(RUNS)/minilm-prune-$$p --data $(HELDOUT) --out $(RUNS)/minilm-prune-$$p.heldout-eval || exit 1; \
	done

# EmbeddingGemma-300M exported and run by Python onnxruntime vs sentence-transformers.
parity-embeddinggemma-onnx: build $(GEMMA)/model.safetensors python-deps onnxruntime
	$(EFFIR) export --model $(GEMMA) --profile sentence-transformers --out $(RUNS)/onnx/embeddinggemma --overwrite
	$(PYTHON) benchmarks/parity_embeddinggemma.py --model $(GEMMA) --onnx $(RUNS)/onnx/embeddinggemma

# EffiR study (issue 4). MiniLM evaluates on the full SciFact corpus (the
# drop study's seven evaluations take about an hour on 2 cores); SAMPLE=N
# evaluates on a fixed sample of N documents instead (every judged one plus
# random others, seed 0). EmbeddingGemma evaluates on $(GEMMA_SAMPLE) SciFact
# documents at max length 256 (GEMMA_SAMPLE= (empty) uses the full corpus,
# about 30 minutes an evaluation), and on the whole of $(HELDOUT).
SAMPLE ?=
GEMMA_SAMPLE ?= 2000
sample_flag = $(if $(1),--doc-sample $(1) --seed 0,)

analyze-minilm: build models
	$(EFFIR) analyze --model $(MINILM) --data $(DATA) --out $(RUNS)/analyze-minilm

# The drop study on SciFact (importance calibrated there), then the same
# drops scored on the held-out set.
drop-study-minilm: build models
	$(EFFIR) drop-study --model $(MINILM) --data $(DATA) --k 1,2,3 $(call sample_flag,$(SAMPLE)) --out $(RUNS)/drop-study-minilm
	$(EFFIR) drop-study --model $(MINILM) --data $(HELDOUT) --k 1,2,3 \
	  --importance $(RUNS)/drop-study-minilm/importance.json --out $(RUNS)/drop-study-minilm-heldout

prune-minilm: build models
	for p in 25 50 70; do \
	  rm -rf $(RUNS)/minilm-prune-$$p; \
	  $(EFFIR) prune --model $(MINILM) --plan configs/prune-minilm-$$p.yaml --data $(DATA) --out $(RUNS)/minilm-prune-$$p || exit 1; \
	  $(EFFIR) eval --model $(RUNS)/minilm-prune-$$p --data $(DATA) $(call sample_flag,$(SAMPLE)) --out $(RUNS)/minilm-prune-$$p.eval || exit 1; \
	done

results-minilm: analyze-minilm drop-study-minilm prune-minilm

# EmbeddingGemma-300M (1.2 GB): about 3 documents/s on 2 cores, hence max
# length 256 and a document sample for the SciFact evaluations.
analyze-embeddinggemma: build $(GEMMA)/model.safetensors
	$(EFFIR) analyze --model $(GEMMA) --data $(DATA) --max-length 512 --calib-tokens 16384 --out $(RUNS)/analyze-embeddinggemma

# The drop study on SciFact (importance calibrated there), then the same
# drops scored on the held-out set.
drop-study-embeddinggemma: build $(GEMMA)/model.safetensors
	$(EFFIR) drop-study --model $(GEMMA) --data $(DATA) --max-length 256 --k 4,8 --calib-tokens 8192 \
	  $(call sample_flag,$(GEMMA_SAMPLE)) --batch-size 16 --out $(RUNS)/drop-study-embeddinggemma
	$(EFFIR) drop-study --model $(GEMMA) --data $(HELDOUT) --max-length 256 --k 4,8 \
	  --importance $(RUNS)/drop-study-embeddinggemma/importance.json --batch-size 16 --out $(RUNS)/drop-study-embeddinggemma-heldout

# EmbeddingGemma plan $(1) (configs/prune-embeddinggemma-$(1).yaml) pruned
# into $(RUNS)/embeddinggemma-prune-$(1); a model directory $(1) scored on the
# SciFact sample and on all of $(HELDOUT) (into $(1).eval, $(1).heldout-eval).
gemma_prune = $(EFFIR) prune --model $(GEMMA) --max-length 256 --plan configs/prune-embeddinggemma-$(1).yaml --data $(DATA) \
  --calib-tokens 16384 --batch-size 16 --out $(RUNS)/embeddinggemma-prune-$(1)
gemma_eval = $(EFFIR) eval --model $(1) --max-length 256 --data $(DATA) $(call sample_flag,$(GEMMA_SAMPLE)) --batch-size 16 --out $(1).eval && \
  $(EFFIR) eval --model $(1) --max-length 256 --data $(HELDOUT) --batch-size 16 --out $(1).heldout-eval

GEMMA_PLANS ?= 25 50 70
prune-embeddinggemma: build $(GEMMA)/model.safetensors
	for p in $(GEMMA_PLANS); do \
	  rm -rf $(RUNS)/embeddinggemma-prune-$$p; \
	  $(call gemma_prune,$$p) || exit 1; \
	  $(call gemma_eval,$(RUNS)/embeddinggemma-prune-$$p) || exit 1; \
	done

# Narrow-only EmbeddingGemma plans with least-squares reconstruction (no
# training), scored like prune-embeddinggemma.
GEMMA_REFIT_PLANS ?= 25-refit 50-refit
prune-embeddinggemma-refit:
	$(MAKE) prune-embeddinggemma GEMMA_PLANS="$(GEMMA_REFIT_PLANS)"

# Label-free recovery of the EmbeddingGemma refit plans (pruned first if
# need be): distillation on the SciFact corpus text
# (configs/recover-embeddinggemma.yaml), scored like prune-embeddinggemma on
# the $(GEMMA_SAMPLE)-document SciFact sample and Cranfield. An interrupted
# run resumes from its checkpoints when the target is run again.
GEMMA_RECOVER_PLANS ?= 25-refit 50-refit
recover-embeddinggemma: build $(GEMMA)/model.safetensors
	for p in $(GEMMA_RECOVER_PLANS); do \
	  test -f $(RUNS)/embeddinggemma-prune-$$p/config.json || $(call gemma_prune,$$p) || exit 1; \
	  $(call resumable_finetune,$(RUNS)/embeddinggemma-prune-$$p,$(RUNS)/embeddinggemma-prune-$$p-distill,--train-texts $(DATA),configs/recover-embeddinggemma.yaml); \
	  $(call gemma_eval,$(RUNS)/embeddinggemma-prune-$$p-distill) || exit 1; \
	done

results-embeddinggemma: analyze-embeddinggemma drop-study-embeddinggemma prune-embeddinggemma

clean:
	cargo clean
	rm -rf $(RUNS)
