#!/usr/bin/env bash
# GPU acceptance of selm-train (see bench/gpu/TRAIN.md and train_acceptance.py's docstring).
# Unattended: no Hub, no prompts. Exit 0: every check passed; 1: a check failed; 2: no GPU.
# Usage: bash bench/gpu/train_acceptance.sh [--gpus N] [--only selm-zero3 lora offload loop]
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
LOG=${LOG:-train_acceptance.$(date -u +%Y%m%dT%H%M%SZ).log}
echo "selm-train GPU acceptance: $($PYTHON -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' 2>&1)" | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1 | tee -a "$LOG"
$PYTHON bench/gpu/train_acceptance.py "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "exit $status (log: $LOG)" | tee -a "$LOG"
exit "$status"
