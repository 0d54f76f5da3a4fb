"""The prompt-vs-IAPT benchmark's plumbing on SmolLM2 (two servers), so it cannot
rot. No timing is asserted: only that both modes ran, every metric was recorded and
the report files were written. Each long benchmark test has its own file, so that
xdist can run them on different workers."""

from __future__ import annotations

import json

import pytest

from test_benchmarks import run


@pytest.mark.server
def test_prompt_vs_iapt_quick_plumbing(tmp_path):
    """Both modes served and measured on SmolLM2 with the committed tenants; the KV
    accounting follows from the prompts (the prompt mode carries the tenant prefix)."""
    run(["benchmarks/prompt_vs_iapt.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "prompt_vs_iapt.json").read_text())
    by = {r["mode"]: r for r in data["results"]}
    assert set(by) == {"prompt", "iapt"} and all(r["tenants"] == 4 for r in by.values())
    for r in by.values():
        assert r["output_tok_s"] > 0 and r["ttft_p50_ms"] > 0 and r["completion_tokens"] > 0
        assert 0 <= r["prefix_cache_hit_rate"] <= 1 and r["max_concurrency_without_preemption"] > 0
    prompt, iapt = by["prompt"], by["iapt"]
    assert prompt["prompt_tokens"] > iapt["prompt_tokens"] + 300  # the 320-440-token tenant prefixes
    assert iapt["kv_tokens_per_seq"] == iapt["prompt_tokens"] + iapt["completion_tokens"] + 4  # 4 soft slots
    assert prompt["shared_prefix_blocks"] > 0 and iapt["shared_prefix_blocks"] == 0
    assert prompt["prefix_cache_hit_rate"] > 0  # the warm-up cached the four tenant prefixes
    assert (tmp_path / "out" / "prompt_vs_iapt.png").stat().st_size > 0
