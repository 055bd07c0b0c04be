#!/usr/bin/env bash
# GPU check of the swaa backend (issue 4): at most ~8 minutes on one H200, installs nothing.
#   1. both CUDA paths (Triton kernel, flash-attn path) and a CUDA-graph decode replay
#      against the dense reference on random paged batches, plus one-layer kernel timings;
#   2. prefill at 32k and 128k tokens on a random-weight Qwen3-4B-shaped model:
#      SWAA (W=2048, k=100, all layers sliding / every other layer full) against vLLM's
#      FLASH_ATTN and TRITON_ATTN; the table of ratios is printed last.
# Needs: an environment with the CUDA build of vLLM 0.33 and this checkout installed
# (pip install -e ".[gpu]"). Run from anywhere: benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# kernels/ is the import package swaa_kernels: make it importable without installing anything.
SHIM="$(mktemp -d)"; ln -s "$PWD/kernels" "$SHIM/swaa_kernels"
export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== 1/2 kernels vs reference (needs torch + triton; the flash-attn path also needs vLLM's CUDA build)"
timeout 150 "$PY" benchmarks/gpu_check_kernels.py
echo "== 2/2 end-to-end prefill"
if "$PY" -c "import vllm" 2>/dev/null; then
  timeout 330 "$PY" benchmarks/gpu_check_prefill.py
else
  echo "SKIPPED: vLLM is not installed in this environment (pip install -e '.[gpu]' with network access first)"
fi
