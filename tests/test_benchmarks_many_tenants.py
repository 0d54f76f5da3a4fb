"""The many-tenants benchmark's plumbing on the tiny model (every server up at once,
eager), so it cannot rot. No timing is asserted: only that every system and N ran
without an error, every request produced the output length asked for, adapters were
found by name through the resolvers, the first-request and later TTFTs and the
memory samples were recorded and the report files were written."""

from __future__ import annotations

import json

import pytest

from test_benchmarks import run

SYSTEMS = {"base", "iapt", "lora-max8"}  # --quick's: every server eager, so base-eager would be base


@pytest.mark.server
def test_many_tenants_quick_plumbing(tmp_path):
    out = tmp_path / "out"
    stdout = run(["benchmarks/many_tenants.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    data = json.loads((out / "many_tenants.json").read_text())
    meta, results, first = data["meta"], data["results"], data["first_pass"]
    assert meta["n"] == [1, 8] and set(meta["systems"]) == SYSTEMS

    # Every system at every (N, law): N=1 is 'identical', N=8 each default law.
    cells = {(r["system"], r["n"], r["popularity"]) for r in results}
    assert cells == {(s, 1, "identical") for s in SYSTEMS} | {
        (s, 8, law) for s in SYSTEMS for law in ("uniform", "zipf", "distinct")}
    for r in results:
        assert r["errors"] == 0 and r["completed"] == r["requests"] == meta["num_requests"], r
        assert r["wrong_length"] == 0
        assert r["completion_tokens_min"] == r["completion_tokens_max"] == meta["output_len"], r
        assert r["output_tok_s"] > 0 and r["ttft_later_p50_ms"] > 0 and r["ttft_later_p99_ms"] >= r["ttft_later_p50_ms"]
        assert r["first_requests"] == 0  # the first pass saw every adapter
        if r["system"] != "base":
            assert r["tok_s_vs_base"] > 0
        if r["system"] not in ("base", "base-eager"):  # adapter systems: a tenant's first request vs later ones
            assert r["first_pass_ttft_p50_ms"] > 0 and r["first_over_warm_p50"] > 0
        assert r["pss_after_bytes"] > 0 and r["fds_after"] > 0

    # The first pass: one first request per adapter of each N, on each adapter system.
    assert {(r["system"], r["n"]) for r in first} == {(s, n) for s in ("iapt", "lora-max8") for n in (1, 8)}
    for r in first:
        assert r["errors"] == 0 and r["first_requests"] == r["n"], r
        assert r["ttft_first_p50_ms"] > 0 and r["completion_tokens_min"] == meta["output_len"]

    # Adapters were found by name: the warm-up adapter and every tenant, once each (1 + 1 + 8).
    logs = meta["log_counts"]
    assert logs["iapt"]["resolved_iapt"] == 10 and logs["iapt"]["iapt_unregistered"] == 0
    assert logs["lora-max8"]["resolved_lora"] == 10
    snaps = [m for m in data["memory"] if m["system"] == "iapt"]
    assert snaps and snaps[-1]["snapshot_files"] >= 2 * 10  # a config and a weights file per adapter

    raw = [json.loads(line) for line in (out / "raw" / "many_tenants_requests.jsonl").read_text().splitlines()]
    assert len(raw) == sum(r["requests"] for r in results + first)
    assert all(x["error"] is None and x["ttft_s"] > 0 for x in raw)
    assert not any(x["first"] for x in raw if x["system"].startswith("base"))

    md = (out / "many_tenants.md").read_text()
    assert "| 8 | zipf | iapt |" in md and "## Targets" in md and "--max-cpu-loras" in md
    assert (out / "many_tenants.png").stat().st_size > 0
    assert "Many tenants" in stdout
