#!/usr/bin/env bash
# The main job: set up the environment and serve the bundled demo: a tiny LLaMA
# and four IAPT tenants (sort, reverse, upper, count) as OpenAI model names.
#   scripts/demo.sh                 # http://127.0.0.1:8000/v1
#   PORT=8001 scripts/demo.sh       # another port; extra arguments go to `vllm serve`
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
DEMO="$ROOT/examples/demo"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec "${IAPT_VENV:-$ROOT/.venv}/bin/vllm" serve "$DEMO/model" --served-model-name demo \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --dtype float32 --max-model-len 256 \
    --enable-iapt --iapt-modules sort="$DEMO/adapters/sort" reverse="$DEMO/adapters/reverse" \
    upper="$DEMO/adapters/upper" count="$DEMO/adapters/count" "$@"
