"""The soak and fault harness (`benchmarks/soak.py`, the package `benchmarks/soak/`):
its checker on hand-made answers (so a wrong or leaked answer cannot pass), its
readings of /metrics and of process memory, then a `--quick` run against a real
`vllm serve --enable-iapt` whose report must meet every target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from soak import report, servers  # noqa: E402
from soak.checker import STOPPING_MESSAGE  # noqa: E402
from soak.run import Run  # noqa: E402
from soak.workload import Job  # noqa: E402


def fake_run() -> Run:
    run = object.__new__(Run)
    run.ref = {("a", "cmpl", 0): [5, 6, 7, 8], ("b", "cmpl", 0): [9, 9, 9, 9], ("c", "cmpl", 0): [5, 6, 1, 1]}
    run.served_models = ["a", "b", "c"]
    return run


def test_checker_tells_correct_leak_and_mismatch():
    run = fake_run()
    job = Job(0, "cmpl", False, "a", 0, 4)
    assert run.classify(job, {"status": 200, "tokens": [5, 6, 7, 8]}) == "correct"
    assert run.classify(job, {"status": 200, "tokens": [9, 9, 9, 9]}) == "leak"  # b's answer
    assert run.classify(job, {"status": 200, "tokens": [5, 6, 7, 9]}) == "mismatch"
    assert run.classify(job, {"status": 200, "tokens": None}) == "mismatch"
    assert run.classify(job, {"status": 500, "error": "boom"}) == "status:500"
    short = Job(0, "cmpl", False, "a", 0, 2)  # a and c agree on two tokens: not a leak
    assert run.classify(short, {"status": 200, "tokens": [5, 6]}) == "correct"
    assert run.classify(Job(0, "cmpl", False, "c", 0, 4), {"status": 200, "tokens": [5, 6, 7, 8]}) == "leak"
    streamed = Job(0, "cmpl", True, "a", 0, 4, abort_after=1)
    assert run.classify(streamed, {"status": 200, "tokens": [5, 6], "aborted": True}) == "aborted-ok"
    assert run.classify(streamed, {"status": 200, "tokens": [9], "aborted": True}) == "aborted-mismatch"


def test_503_naming_the_shutdown_counts_only_during_a_planned_stop():
    """A stopping server's 503 (patches/shutdown.py) is a clean refusal while the
    harness stops it on purpose; any other 503 or 500 is an error."""
    from collections import Counter

    run = fake_run()
    run.results, run.status_codes, run.faults, run.unexpected = Counter(), Counter(), {}, []
    run.latencies, run.runtime, run.t0, run.server = [], {}, 0.0, None
    job = Job(0, "cmpl", False, "a", 0, 4)
    stopping = {"status": 503, "error": f'{{"error": {{"message": "{STOPPING_MESSAGE}"}}}}'}
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
    mem = report.memory_summary(samples, 0.2, 100)["incarnations"][0]
    api = mem["processes"]["api-server (pid 1)"]
    assert api["rss_after_warmup_mib"] == round(1010 / 1024, 1) and api["growth_after_warmup"] == pytest.approx(0.1881, abs=1e-3)
    assert mem["judged"]


METRICS_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 2.0
vllm:num_requests_running{engine="1",model_name="demo"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="demo"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="demo"} 2.5e-01
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="demo"} 7.0
vllm:num_preemptions_created{engine="0",model_name="demo"} 1.7e+09
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="demo"} 640.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="12",prefix_caching_hash_algo="sha256"} 1.0
# HELP vllm_iapt:requests_total Requests admitted to the engine, by IAPT adapter
# TYPE vllm_iapt:requests_total counter
vllm_iapt:requests_total{adapter="sort",model_name="demo"} 3.0
"""


def test_metrics_are_read_per_name_summed_over_engines():
    assert servers.parse_metrics(METRICS_TEXT) == {
        "vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 0.0, "vllm:kv_cache_usage_perc": 0.25,
        "vllm:num_preemptions_total": 7.0, "vllm:prefix_cache_queries_total": 640.0, "num_gpu_blocks": 12.0}
    assert servers.parse_metrics("") == {}


def test_process_memory_of_a_process_group():
    """The sampler's view of a server: every process of its group, named, with
    VmRSS and RssAnon as /proc/<pid>/status gives them."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(60)"],
                            start_new_session=True)
    try:
        for _ in range(100):  # until the allocation is resident
            mem = servers.rss_kib(proc.pid)
            if mem and mem[1] > 60 << 10:
                break
            time.sleep(0.1)
        assert servers.group_pids(proc.pid) == [proc.pid]
        assert servers.proc_name(proc.pid) == os.path.basename(sys.executable)
        status = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        rss, anon = (int(status[k].split()[0]) for k in ("VmRSS", "RssAnon"))
        assert servers.rss_kib(proc.pid) == (rss, anon) and anon > 60 << 10
    finally:
        proc.kill()
        proc.wait()
    assert servers.rss_kib(proc.pid) is None and servers.proc_name(proc.pid) == "?"


@pytest.mark.server
@pytest.mark.timeout(1200)
def test_quick_soak_meets_targets(tmp_path):
    out = tmp_path / "soak"
    # 150 requests (--quick's default is 500): the faults are spread over the requests,
    # so every one of them still runs, with less traffic between them (measured: 46
    # malformed loads, 10 file changes, 3 churns, the canary; 95 s on one core).
    proc = subprocess.run([sys.executable, "benchmarks/soak.py", "--quick", "--requests", "150", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=ROOT,
                          capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    rep = json.loads((out / "soak.json").read_text())
    req = rep["requests"]
    assert req["sent"] >= 140 and req["correct"] >= 0.7 * req["sent"], req
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
