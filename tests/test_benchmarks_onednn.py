"""The oneDNN-cache benchmark's plumbing on SmolLM2 (two servers), so it cannot
rot. No timing is asserted. A file of its own so that xdist can run it beside the
other long benchmark tests."""

from __future__ import annotations

import json

import pytest

from test_benchmarks import run


@pytest.mark.server
def test_onednn_cache_quick_plumbing(tmp_path):
    """One server per oneDNN cache capacity, each worker seeing its own setting, every
    request completed and the worker's memory read before and after."""
    run(["benchmarks/onednn_cache.py", "--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "onednn_cache.json").read_text())
    by = {r["capacity"]: r for r in data["results"]}
    assert set(by) == {"default", "1"}
    assert by["default"]["worker_rss_anon"]["worker_env"] is None and by["1"]["worker_rss_anon"]["worker_env"] == "1"
    for r in by.values():
        assert r["completed"] == data["meta"]["run"]["num_prompts"] and r["output_throughput"] > 0
        assert r["worker_rss_anon"]["after_warmup_mib"] > 0 and r["worker_rss_anon"]["end_mib"] > 0
    assert by["default"]["throughput_ratio_to_default"] == 1.0
    assert "| 1 |" in (tmp_path / "onednn_cache.md").read_text()
