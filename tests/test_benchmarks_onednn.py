"""The oneDNN-cache benchmark's plumbing on SmolLM2 (one server), so it cannot
rot. No timing is asserted. A file of its own so that xdist can run it beside the
other long benchmark tests."""

from __future__ import annotations

import json

import pytest

from test_benchmarks import run


@pytest.mark.server
def test_onednn_cache_quick_plumbing(tmp_path):
    """A server with a oneDNN cache capacity set: its worker sees the setting, every
    request completed and the worker's memory was read before and after. One
    capacity only (the script compares several the same way; each server costs
    about 40 s of start-up here)."""
    run(["benchmarks/onednn_cache.py", "--quick", "--capacities", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "onednn_cache.json").read_text())
    (r,) = data["results"]
    assert r["capacity"] == "1" and r["worker_rss_anon"]["worker_env"] == "1"
    assert r["completed"] == data["meta"]["run"]["num_prompts"] and r["output_throughput"] > 0
    assert r["worker_rss_anon"]["after_warmup_mib"] > 0 and r["worker_rss_anon"]["end_mib"] > 0
    assert r["throughput_ratio_to_1"] == 1.0  # the ratio to the first capacity given
    assert "| 1 |" in (tmp_path / "onednn_cache.md").read_text()
