#!/usr/bin/env bash
# Start `vllm serve` with the swaa attention backend (entrypoint of both images in docker/).
#
#   entrypoint.sh [MODEL] [extra `vllm serve` arguments...]
#
# MODEL: first argument if it does not start with "-", else $MODEL. Environment:
#   MODEL               model directory or Hugging Face name (required unless given as argument)
#   SWAA_CONFIG         swaa_config JSON object, passed as --hf-overrides '{"swaa_config": ...}';
#                       unset or empty: the model's own config.json decides (no swaa_config = plain causal)
#   SERVED_MODEL_NAME   --served-model-name (optional)
#   HOST, PORT          listen address (default 0.0.0.0:8000)
#   VLLM_BIN            the vllm executable (default: vllm on PATH)
#   PYTHON              a Python 3 interpreter, used to check SWAA_CONFIG (default: python3)
#   SWAA_DRY_RUN=1      print the command (shell-quoted, one line) instead of running it
# vLLM picks its model runner as usual (V2 by default); swaa works with V2 and V1.
# Exit status 2: no model, or SWAA_CONFIG is not a JSON object.
set -euo pipefail

die() { echo "swaa entrypoint: $*" >&2; exit 2; }

model="${MODEL:-}"
if [[ $# -gt 0 && "$1" != -* ]]; then
  model="$1"
  shift
fi
[[ -n "$model" ]] || die "no model: pass it as the first argument or set MODEL (a model directory or Hugging Face name)"

cmd=("${VLLM_BIN:-vllm}" serve "$model" --attention-backend swaa --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}")
if [[ -n "${SERVED_MODEL_NAME:-}" ]]; then
  cmd+=(--served-model-name "$SERVED_MODEL_NAME")
fi
if [[ -n "${SWAA_CONFIG:-}" ]]; then
  # Validate here so that a typo stops the container at once with a clear message; vLLM then checks
  # the fields against the model at start-up ("invalid swaa_config: ..." naming the field).
  overrides=$("${PYTHON:-python3}" -c '
import json, sys
try:
    value = json.loads(sys.argv[1])
except json.JSONDecodeError as err:
    sys.exit(f"SWAA_CONFIG is not a JSON object: {err.msg} at character {err.pos} of {sys.argv[1]!r}")
if not isinstance(value, dict):
    sys.exit(f"SWAA_CONFIG is not a JSON object: got a JSON {type(value).__name__} ({sys.argv[1]!r})")
print(json.dumps({"swaa_config": value}))
' "$SWAA_CONFIG" 2>&1) || die "${overrides}; example: SWAA_CONFIG='{\"sliding_window_size\": 2048, \"keep_first\": 100, \"force_fa_decode\": true}'"
  cmd+=(--hf-overrides "$overrides")
fi
cmd+=("$@")

if [[ "${SWAA_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
