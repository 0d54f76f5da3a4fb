#!/usr/bin/env bash
# The main job: set up the environment and run the demo.
# (Until the server and bundled demo land, this runs examples/quickstart.py:
# a tiny model and adapter trained here, compared with the base model.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${IAPT_VENV:-$ROOT/.venv}/bin/python" examples/quickstart.py "$@"
