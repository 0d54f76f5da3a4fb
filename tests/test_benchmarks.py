"""The benchmark scripts' plumbing on tiny models, so they cannot rot. No timing
is asserted: only that every system ran, every metric and ratio was recorded and
the report files were written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: int = 1800) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


def test_generator_microbenchmark(tmp_path):
    out = run(["benchmarks/generator_micro.py", "--quick", "--rows", "64", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "generator_micro.json").read_text())
    assert {(r["d"], r["r"]) for r in data["results"]} == {(256, 64), (256, 320), (1024, 64), (1024, 320)}
    for r in data["results"]:
        assert r["generator_s"] > 0 and r["layer_s"] > 0 and 0 < r["predicted_ratio"] < 1
    assert (tmp_path / "generator_micro.png").stat().st_size > 0
    assert "| 1024 | 320 |" in out


@pytest.mark.server
def test_serving_benchmark_quick_plumbing(tmp_path):
    systems = ["base-nochunk", "iapt", "lora-r8"]
    run(["benchmarks/serve_bench.py", "--quick", "--size", "tiny", "--work-dir", str(tmp_path / "work"),
         "--out", str(tmp_path / "out"), "--systems", *systems])
    data = json.loads((tmp_path / "out" / "serve_bench.json").read_text())
    results = data["results"]
    assert {r["system"] for r in results} == set(systems)
    for r in results:
        assert r["completed"] == r["num_prompts"], r
        assert r["output_throughput"] > 0 and r["median_ttft_ms"] > 0
    iapt = [r for r in results if r["system"] == "iapt"]
    assert sorted(r["num_adapters"] for r in iapt) == [1, 4]
    assert all("throughput_vs_same_settings" in r for r in iapt)  # compared with base-nochunk
    assert (tmp_path / "out" / "throughput_vs_adapters.png").stat().st_size > 0
    assert data["meta"]["versions"]["vllm"]


def test_cold_adapter_benchmark_quick_plumbing(tmp_path):
    """Both ways ran on the same engine: with read-ahead every cold adapter was read
    ahead of its step, with the announcements off every one inside a step."""
    run(["benchmarks/cold_adapters.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cold_adapters.json").read_text())
    ahead, inside = data["results"]["read ahead"], data["results"]["read in the step"]
    cold = data["meta"]["cold"]
    assert (ahead["read_ahead"], ahead["read_in_step"]) == (cold, 0)
    assert (inside["read_ahead"], inside["read_in_step"]) == (0, cold)
    for r in (ahead, inside):
        assert r["steps_starting_cold"] > 0 and r["step_ms_starting_cold_p50"] > 0 and r["warm_tok_s"] > 0
        assert r["cold_ttft_ms_p50"] > 0
    assert "| warm requests' output tok/s |" in (tmp_path / "cold_adapters.md").read_text()
