#!/usr/bin/env bash
# GPU energy check in one command, on a machine with one NVIDIA GPU and no network.
#
# Builds a random ~1B Llama from a config and measures bf16, torchao int8 and int4 weight-only,
# 2:4 sparsity (sparse kernels) and depth -25% with greenopt's NVML meter; prints JSON and, when
# $OUT is set, writes it to $OUT/gpu_check.json (after every variant, so a cut-short run keeps
# what it measured). Hard limit: GPU_CHECK_TIMEOUT_S (default 480 s = 8 minutes); the Python
# driver plans its work to --budget-s (default 440 s) inside it.
#
# Usage: scripts/gpu_check.sh [--mode auto|compare|measure] [--budget-s S] [--device cuda:N]
#        scripts/gpu_check.sh --fake      # CPU smoke run with a fake NVML and a tiny model
# Exit: 0 ok, 1 a variant or the meter failed, 2 no CUDA, 124 the hard limit was hit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-480}" "$py" scripts/gpu_check.py "$@"
