#!/usr/bin/env bash
# Sets up the environment (see scripts/setup.sh) and runs the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# Two workers (this machine's core count), one test file per worker at a time: a
# file's engines and servers are shared by its tests. `-n 0` runs in one process.
exec "${IAPT_VENV:-$ROOT/.venv}/bin/python" -m pytest -n "${IAPT_TEST_WORKERS:-2}" --dist loadfile "$@"
