#!/usr/bin/env bash
# GPU readiness check (issue 19, item 10). On a machine with an NVIDIA GPU, from the repository root, after
# `bash scripts/setup.sh --dev` (with a CUDA build of torch), in under 10 minutes:
#   1. the card (nvidia-smi) and what torch sees;
#   2. the tests that need CUDA: parity on the GPU (tests/parity/test_cuda.py: logits and every site of every family
#      against plain transformers), attribution graphs and their commands on cuda against the CPU, training and the
#      induction toy on cuda against the CPU (every test file that checks torch.cuda.is_available, -k "cuda or gpu");
#   3. `mechscope sae harvest --device cuda` on a few thousand tokens (the command end to end);
#   4. bench/gpu_check.py: tokens/s of a harvest (200k tokens of SmolLM2-135M in bf16) and of dictionary training
#      (TopK and dense), with MFU against the card's bf16 dense peak, as a table.
# Without a GPU it says so and exits 2 at once. Exit status: 0 every step passed, 1 a step failed, 2 no GPU here.
# Usage: bash bench/gpu_check.sh [arguments for bench/gpu_check.py, e.g. --json results.json --tokens 400000]
# The steps run under time limits (260 + 60 + 200 s) that keep the whole check under 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
no_gpu() { echo "gpu_check: $*" >&2; exit 2; }

[ -x "$PY" ] || no_gpu "no $PY; run 'bash scripts/setup.sh --dev' in the repository root first."
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "no NVIDIA GPU here (nvidia-smi not found); run this on a GPU machine."
card=$(timeout 15 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
[ -n "$card" ] || no_gpu "nvidia-smi lists no GPU (is the driver loaded? is CUDA_VISIBLE_DEVICES empty?)."
echo "card: $(timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
"$PY" - <<'PY' || no_gpu "torch cannot use the GPU (above); install a CUDA build of the pinned torch into .venv."
import sys

import torch

if not torch.cuda.is_available():
    build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    sys.exit(f"torch {torch.__version__} is {build} and sees no GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s), "
      f"cuda:0 = {torch.cuda.get_device_name(0)}")
PY

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, remember a failure
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "== $name: passed in $((SECONDS - t0)) s"
  else
    [ $rc -eq 124 ] && echo "== $name: timed out after ${limit} s" || echo "== $name: FAILED (exit $rc)"
    status=1
  fi
}

mapfile -t cuda_tests < <(grep -rlE "cuda\.is_available" tests --include='test_*.py' | sort)
step "CUDA tests: ${cuda_tests[*]}" 260 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" "${cuda_tests[@]}"
work=$(mktemp -d -t mechscope-gpu-check-XXXXXX)
trap 'rm -rf "$work"' EXIT
step "mechscope sae harvest --device cuda" 60 "$PY" -m mechscope sae harvest --hook blocks.15.hook_resid_post \
  --tokens 8192 --corpus pysource --device cuda --out "$work/harvest"
step "throughput (bench/gpu_check.py)" 200 "$PY" bench/gpu_check.py --card "$card" "$@"
echo
[ $status -eq 0 ] && echo "gpu_check: every step passed in $SECONDS s" || echo "gpu_check: a step FAILED (above); $SECONDS s"
exit $status
