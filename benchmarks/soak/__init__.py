"""Soak and fault harness: many concurrent clients against `vllm serve --enable-iapt`,
every answer checked against the reference model, faults injected while it runs.

    ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 .venv/bin/python benchmarks/soak.py   # default: 10,000 requests (~7 min on 2 cores)
    .venv/bin/python benchmarks/soak.py --quick           # up to 500 requests (150 s at most), each malformed load and file change once, no restart (the test suite)
    .venv/bin/python benchmarks/soak.py --requests 2000 --restarts 0 --out /tmp/soak

The server runs on 127.0.0.1 only: the bundled demo model (`examples/demo`) with its
four static tenants, run-time adapters loaded and unloaded over HTTP from a
scratch `--iapt-adapter-dir`, and prefix caching: a small KV cache (forces
preemption) until the planned restart, a large one after it (prefix-cache hits).
Requests mix the base model, static tenants, run-time adapters and one
adapter found by the directory resolver; completions and chat; streaming or not;
prompt lengths 1..max from a fixed pool (so repeated prompts hit the prefix cache).
Decoding is greedy with ``ignore_eos``; every answer is compared, token for token,
with the transformers reference (`vllm_iapt.reference`) for its (adapter, prompt):
an answer equal to another adapter's reference and not to its own is a *leak*.
Prompts whose reference has a near-tie (top-2 log-probability gap below
``--min-margin`` at any generated step, for any adapter) are dropped from the pool
beforehand, so float noise cannot be mistaken for a wrong answer.

Faults, injected while traffic runs: client aborts mid-stream, load/unload churn
(including ``load_inplace``), a catalogue of malformed loads (each must be a 4xx),
adapter files replaced / deleted / re-linked / truncated after they were loaded
(each request must be served with validated content, the content at load or the
new files' once re-validated, or fail cleanly with a 4xx; never another adapter's
or an outside directory's output), and the server stopped and restarted. A server that dies is recorded, restarted, and the
run goes on, so the report says what happened instead of stopping at the first
failure.

Report: ``soak.json``, ``soak.md`` and ``soak.png`` (latency and the resident
memory of every server process over time) in ``--out``.
"""

# The package, one role per module; `benchmarks/soak.py` runs `cli.main`:
#   cli.py      arguments, Settings, settings_from, main (one run: set up, traffic, report)
#   run.py      Run: the state one run shares between the parts below; set-up and the event loop
#   workload.py traffic: the prompt pool, the request plan (popularity, streaming, aborts), clients
#   checker.py  correctness: reference answers, correct / leak / mismatch, what each outcome counts as
#   adapters.py adapters on disk: good ones and the catalogue of malformed ones
#   faults.py   faults injected while traffic runs: malformed loads, file changes, churn, the schedule
#   servers.py  the server: command, start / stop / restart, death detection, /metrics, process memory
#   report.py   soak.json, soak.md, soak.png

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
ROOT = BENCHMARKS.parent
DEMO = ROOT / "examples" / "demo"
BASE = "demo"  # the served base model's name
