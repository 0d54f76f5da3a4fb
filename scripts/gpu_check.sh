#!/usr/bin/env bash
# GPU check for vllm-iapt: run this first on a CUDA machine, from a fresh clone.
#
#   scripts/gpu_check.sh [--work-dir DIR] [--gpu-memory-utilization F]
#
# NOT RUN YET: written on a CPU-only machine, where it was seen to stop at once
# without a CUDA device and only the parts of scripts/gpu_check.py that need no CUDA
# could be tried. No GPU run of vllm-iapt has been made so far (README, "Checking on
# a GPU").
#
# It runs the README's set-up (scripts/setup.sh, CUDA build of vLLM), then
# scripts/gpu_check.py: a tiny bf16 LLaMA and 8 adapters; vLLM's default CUDA path
# (torch.compile, CUDA graphs, cudagraph metrics) checked against an enforce_eager
# engine and the transformers reference; breakable CUDA graphs; a planned prefill
# step timed with 1 and 8 adapters; host-device syncs in a planned step. Target:
# under 5 minutes on one H100 after set-up. The last line is the verdict:
# "GPU CHECK: PASS" or "GPU CHECK: FAIL (reasons)". Exit status 0 pass, 1 fail,
# 2 no CUDA device.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "[gpu_check] no CUDA device: nvidia-smi is missing or lists no GPU; this check needs a CUDA machine" >&2
  echo "GPU CHECK: FAIL (no CUDA device)"
  exit 2
fi
if [ -n "${IAPT_DEVICE:-}" ] && [ "$IAPT_DEVICE" != cuda ]; then
  echo "[gpu_check] IAPT_DEVICE=$IAPT_DEVICE: unset it (or set cuda) for the GPU check" >&2
  echo "GPU CHECK: FAIL (IAPT_DEVICE is not cuda)"
  exit 2
fi
nvidia-smi -L
IAPT_DEVICE=cuda "$ROOT/scripts/setup.sh"
exec "${IAPT_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/gpu_check.py" "$@"
