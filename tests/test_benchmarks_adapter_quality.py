"""The adapter-quality benchmark's plumbing (`benchmarks/adapter_quality.py --quick`):
tiny local model, 2 training steps per run, 3 held-out messages per tenant, one
offline engine per serving path, so it cannot rot. No timing and no quality is
asserted: only that every method was trained, evaluated through its serving path,
costed, and reported."""

from __future__ import annotations

import json

import pytest

from test_benchmarks import run

METHODS = {"iapt", "lora", "prompt", "prefix"}


@pytest.mark.engine  # two offline vLLM engines (IAPT; LoRA + prompt embeddings), no server
def test_adapter_quality_quick_plumbing(tmp_path):
    out = tmp_path / "out"
    md = run(["benchmarks/adapter_quality.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
             timeout=600)
    report = json.loads((out / "adapter_quality.json").read_text())
    assert set(report["tenants"]) == {"json", "triage"}
    ref = report["meta"]["reference"]["params"]
    for tenant, t in report["tenants"].items():
        assert t["teacher"]["scores"]["rule"] >= 0 and t["base"]["scores"]["rule"] >= 0
        assert {r["method"] for r in t["runs"]} == METHODS
        for r in t["runs"]:
            assert r["params"] > 0 and r["train"]["steps"] == 2 and r["train"]["seconds"] > 0, r["run"]
            assert not r["train"]["reused_committed"]
            assert r["n"] == 3 and len(r["samples"]) == 3
            s = r["scores"]
            assert all(0 <= s[k] <= 1 for k in ("rule", "agreement", "exact_match_teacher", "word_f1_teacher"))
            assert ("intended_label" in s) == (tenant == "triage")
            expected_path = {"iapt": "vllm-iapt engine", "lora": "multi-LoRA", "prompt": "prompt embeddings",
                             "prefix": "PEFT generate"}  # prompt tuning falls back to PEFT if the embeddings path differs
            assert r["quality_path"].startswith(("vLLM", "PEFT")) and expected_path[r["method"]] in r["quality_path"]
            if r["method"] in ("lora", "prompt"):  # the vLLM path was checked against PEFT's own generation
                assert r["path_check"]["prompts"] == 2 and 0 <= r["path_check"]["identical_to_peft"] <= 2
        by = {r["method"]: r["params"] for r in t["runs"]}
        assert by["iapt"] == ref
        for m in ("lora", "prefix"):  # matched: no farther from IAPT's count than one size step
            assert abs(by[m] - ref) < 0.7 * ref, (m, by[m], ref)
    cost = report["cost"]
    assert {c["method"] for c in cost.values()} == METHODS | {"base"}
    assert {c["engine"] for c in cost.values()} == {"iapt", "vllm"}
    for name, c in cost.items():
        assert c["output_tok_s"] > 0 and c["ttft_ms"] > 0 and c["tok_s_vs_base"] > 0 and c["ttft_vs_base"] > 0, name
        assert c["kv_tokens_per_seq"] > c["kv_extra_tokens"] >= 0
    assert cost["base@iapt"]["tok_s_vs_base"] == 1.0
    assert next(c for c in cost.values() if c["method"] == "iapt")["kv_extra_tokens"] == 4
    assert (out / "adapter_quality" / "json-iapt-r16.json").is_file()  # one result file per run: resumable
    assert (out / "adapter_quality.png").stat().st_size > 0
    assert (out / "adapter_quality.md").read_text() in md and "## `triage`" in md
