"""The soak and fault harness (`benchmarks/soak.py`): its checker on hand-made
answers (so a wrong or leaked answer cannot pass), then a `--quick` run against a
real `vllm serve --enable-iapt` whose report must meet every target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import soak  # noqa: E402


def fake_run() -> soak.Run:
    run = object.__new__(soak.Run)
    run.ref = {("a", "cmpl", 0): [5, 6, 7, 8], ("b", "cmpl", 0): [9, 9, 9, 9], ("c", "cmpl", 0): [5, 6, 1, 1]}
    run.served_models = ["a", "b", "c"]
    return run


def test_checker_tells_correct_leak_and_mismatch():
    run = fake_run()
    job = soak.Job(0, "cmpl", False, "a", 0, 4)
    assert run.classify(job, {"status": 200, "tokens": [5, 6, 7, 8]}) == "correct"
    assert run.classify(job, {"status": 200, "tokens": [9, 9, 9, 9]}) == "leak"  # b's answer
    assert run.classify(job, {"status": 200, "tokens": [5, 6, 7, 9]}) == "mismatch"
    assert run.classify(job, {"status": 200, "tokens": None}) == "mismatch"
    assert run.classify(job, {"status": 500, "error": "boom"}) == "status:500"
    short = soak.Job(0, "cmpl", False, "a", 0, 2)  # a and c agree on two tokens: not a leak
    assert run.classify(short, {"status": 200, "tokens": [5, 6]}) == "correct"
    assert run.classify(soak.Job(0, "cmpl", False, "c", 0, 4), {"status": 200, "tokens": [5, 6, 7, 8]}) == "leak"
    streamed = soak.Job(0, "cmpl", True, "a", 0, 4, abort_after=1)
    assert run.classify(streamed, {"status": 200, "tokens": [5, 6], "aborted": True}) == "aborted-ok"
    assert run.classify(streamed, {"status": 200, "tokens": [9], "aborted": True}) == "aborted-mismatch"


def test_503_naming_the_shutdown_counts_only_during_a_planned_stop():
    """A stopping server's 503 (patches/shutdown.py) is a clean refusal while the
    harness stops it on purpose; any other 503 or 500 is an error."""
    from collections import Counter

    run = fake_run()
    run.results, run.status_codes, run.faults, run.unexpected = Counter(), Counter(), {}, []
    run.latencies, run.runtime, run.t0, run.server = [], {}, 0.0, None
    job = soak.Job(0, "cmpl", False, "a", 0, 4)
    stopping = {"status": 503, "error": f'{{"error": {{"message": "{soak.STOPPING_MESSAGE}"}}}}'}
    run.restarting = True
    run.record(job, stopping, "status:503", 0.1)
    run.record(job, {"status": 500, "error": "cannot schedule new futures after shutdown"}, "status:500", 0.1)
    assert run.results["refused-while-stopping"] == 1 and run.results["error"] == 1
    run.restarting = False
    run.record(job, stopping, "status:503", 0.1)  # not a planned stop: an error
    assert run.results["refused-while-stopping"] == 1 and run.results["error"] == 2


def test_memory_growth_is_measured_after_warmup():
    def row(t, done, rss):
        return {"t": t, "incarnation": 1, "done": done, "procs": {1: ["api-server", rss + 50, rss], 2: ["EngineCore", 1000, 900]}}

    samples = [row(0, 0, 500), row(1, 10, 1000), row(2, 50, 1010), row(3, 100, 1200)]
    mem = soak.memory_summary(samples, 0.2, 100)["incarnations"][0]
    api = mem["processes"]["api-server (pid 1)"]
    assert api["rss_after_warmup_mib"] == round(1010 / 1024, 1) and api["growth_after_warmup"] == pytest.approx(0.1881, abs=1e-3)
    assert mem["judged"]


@pytest.mark.server
@pytest.mark.timeout(1200)
def test_quick_soak_meets_targets(tmp_path):
    out = tmp_path / "soak"
    proc = subprocess.run([sys.executable, "benchmarks/soak.py", "--quick", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=ROOT,
                          capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    rep = json.loads((out / "soak.json").read_text())
    req = rep["requests"]
    assert req["sent"] >= 200 and req["correct"] >= 0.7 * req["sent"], req
    assert rep["malformed_kinds"] >= 20
    assert rep["faults"]["malformed_load"]["injected"] >= 20
    assert rep["faults"].get("file_change", {}).get("injected", 0) >= 5
    assert sum(v.get("injected", 0) for k, v in rep["faults"].items() if k.startswith("churn_")) >= 3
    assert rep["canary"]["detected"], rep["canary"]
    assert (out / "soak.md").read_text().startswith("# Soak run") and (out / "soak.png").stat().st_size > 0
    # Every target but the 5% memory-growth ones: a quick run ends before the processes'
    # own warm-up does (vLLM's CPU worker without IAPT grows by about 40% over its first
    # ~4,000 requests, see benchmarks/results/soak_control_default_onednn_cache.md, and the engine core was seen
    # at +8.8% after 500 requests but +0.3% after 10,000); the default run judges those.
    # Here the API server and the engine core must stay within 25%, which a leak per
    # request would still break.
    front = rep["memory"]["front_growth_after_warmup"]
    assert front is not None and front < 0.25, rep["memory"]
    missed = [k for k, ok in rep["targets"].items() if not ok and not k.startswith("memory growth after warm-up < 5%")]
    assert not missed, (missed, rep["requests"], rep["status_codes"], rep["server_deaths"][:1],
                        rep["problems (first 50)"][:10])
