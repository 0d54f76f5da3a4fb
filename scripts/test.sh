#!/usr/bin/env bash
# Sets up the environment (see scripts/setup.sh) and runs the whole test suite.
# Extra arguments go to pytest (to both phases), e.g. scripts/test.sh tests/unit -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
PY="${IAPT_VENV:-$ROOT/.venv}/bin/python"
# Two phases. First, alone, the tests marked all_cores (tensor- and pipeline-parallel
# ranks, which spin-wait on every core: beside another test they took three times as
# long, and slowed it too). Then the others on two workers (this machine's core
# count), each pinned to its own core, one test file per worker at a time (a file's
# engines and servers are shared by its tests). `-n 0` runs the second phase in one
# process (slower; easier to debug). Exit status 5 (nothing selected) counts as
# success for one phase, not for both.
set +e
IAPT_TEST_PHASE=all_cores "$PY" -m pytest -n 0 "$@"
first=$?
IAPT_TEST_PHASE=shared "$PY" -m pytest -n "${IAPT_TEST_WORKERS:-2}" --dist loadfile "$@"
second=$?
set -e
if [ "$first" -eq 5 ] && [ "$second" -eq 5 ]; then exit 5; fi
for rc in "$first" "$second"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
