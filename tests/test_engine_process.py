"""Engines in their own processes: the default multi-process engine, preemption
forced by a tiny KV cache, IAPT disabled; and start-up errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_ids

pytestmark = pytest.mark.engine

HARNESS = Path(__file__).with_name("engine_harness.py")


def run_engine(tmp_path, spec: dict, timeout: int = 600) -> dict:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, **spec.pop("process_env", {})}
    proc = subprocess.run([sys.executable, str(HARNESS), str(spec_file)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HARNESS.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def assert_matches_reference(reference, items, results, max_tokens):
    for it, res in zip(items, results):
        path = it["adapter"][2] if it.get("adapter") else None
        ref = reference.generate(it["ids"], path, max_tokens)
        assert res["prompt_token_ids"] == it["ids"]
        assert res["outputs"][0]["token_ids"] == ref.token_ids
        for a, b in zip(res["outputs"][0]["logprobs"], ref.logprobs):
            assert math.isclose(a, b, abs_tol=2e-3)


def test_multiprocess_engine(tmp_path, tiny_model_dir, adapter_factory, reference):
    a = ["a", 1, str(adapter_factory("mp-a", num_soft_tokens=4, seed=11))]
    b = ["b", 2, str(adapter_factory("mp-b", num_soft_tokens=3, activation="relu", bottleneck_dim=24, seed=12))]
    items = [{"ids": random_ids(n, n), "adapter": ad} for n in (3, 40, 200) for ad in (None, a, b)]
    greedy = {"max_tokens": 8, "temperature": 0.0, "logprobs": 0, "ignore_eos": True}
    bad = [{"ids": random_ids(5, 1), "adapter": ["bad", 3, str(tmp_path / "missing")]}]
    result = run_engine(tmp_path, {
        "model": str(tiny_model_dir),
        "process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        "engine": {"additional_config": {"iapt": {}}},
        "batches": [{"items": items, "sampling": greedy}, {"items": bad, "sampling": greedy},
                    {"items": items[:3], "sampling": greedy}],
    })
    assert_matches_reference(reference, items, result["batches"][0], 8)
    assert "does not exist" in result["batches"][1]["error"]
    survived = result["batches"][2]  # the engine survived the bad adapter
    assert [r["outputs"][0]["token_ids"] for r in survived] == [r["outputs"][0]["token_ids"] for r in result["batches"][0][:3]]


def test_preemption_recomputes_soft_tokens(tmp_path, tiny_model_dir, adapter_factory, reference):
    """A KV cache of 12 blocks of 32 tokens for 6 sequences of ~100 tokens forces
    preemption; recomputed sequences must still match the reference."""
    a = ["a", 1, str(adapter_factory("pre-a", num_soft_tokens=4, seed=21))]
    b = ["b", 2, str(adapter_factory("pre-b", num_soft_tokens=6, activation="gelu", seed=22))]
    items = [{"ids": random_ids(40 + i, 300 + i), "adapter": [None, a, b][i % 3]} for i in range(6)]
    max_tokens = 60
    result = run_engine(tmp_path, {
        "model": str(tiny_model_dir),
        "process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "engine": {"additional_config": {"iapt": {}}, "block_size": 32, "num_gpu_blocks_override": 12,
                   "max_model_len": 256, "max_num_batched_tokens": 256, "enable_prefix_caching": False,
                   "disable_log_stats": False},
        "metrics": True,
        "batches": [{"items": items, "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "logprobs": 0,
                                                  "ignore_eos": True}}],
    })
    assert result["num_preemptions"] > 0, "the tiny KV cache should have forced preemption"
    assert_matches_reference(reference, items, result["batches"][0], max_tokens)


def test_iapt_disabled_is_stock_vllm(tmp_path, tiny_model_dir, adapter_factory):
    a = ["a", 1, str(adapter_factory("off-a"))]
    ids = random_ids(10, 1)
    greedy = {"max_tokens": 5, "temperature": 0.0}
    result = run_engine(tmp_path, {
        "model": str(tiny_model_dir),
        "process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "engine": {},
        "inspect_layers": True,
        "batches": [{"items": [{"ids": ids}], "sampling": greedy}, {"items": [{"ids": ids, "adapter": a}], "sampling": greedy}],
    })
    assert result["layer_types"] == ["LlamaDecoderLayer"]
    assert "LoRA is not enabled" in result["batches"][1]["error"]


@pytest.mark.parametrize("kwargs,match", [
    ({"additional_config": {"iapt": {"max_adapters": 0}}}, "max_adapters"),
    ({"additional_config": {"iapt": {"max_adaptors": 4}}}, "max_adaptors"),
    ({"additional_config": {"iapt": {"max_adapters": 8, "max_cpu_adapters": 4}}}, "max_cpu_adapters"),
    ({"additional_config": {"iapt": "yes"}}, "must be a dict"),
    ({"additional_config": {"iapt": {}}, "enable_chunked_prefill": True}, "enable_chunked_prefill"),
    ({"additional_config": {"iapt": {}}, "long_prefill_token_threshold": 64}, "long_prefill_token_threshold"),
    ({"additional_config": {"iapt": {}}, "enable_lora": True}, "IAPT and vLLM LoRA cannot be enabled together"),
    ({"additional_config": {"iapt": {}}, "max_num_batched_tokens": 128}, "max_num_batched_tokens"),
    ({"additional_config": {"iapt": {"placeholder_token_id": 100000}}}, "placeholder_token_id"),
])
def test_bad_engine_options_fail_at_start(tiny_model_dir, kwargs, match):
    from vllm import LLM

    with pytest.raises(Exception, match=match):
        LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=512, **kwargs)


def test_unchecked_vllm_version_is_refused(tiny_model_dir, monkeypatch):
    from vllm import LLM

    from vllm_iapt.patches import engine_args

    monkeypatch.setattr(engine_args, "CHECKED_VLLM_VERSIONS", ("0.0.1",))
    with pytest.raises(ValueError, match="checked on vLLM 0.0.1, not 0.32.0"):
        LLM(model=str(tiny_model_dir), dtype="float32", additional_config={"iapt": {}})
    # The explicit override passes the version check (and nothing else changes).
    from vllm.engine.arg_utils import EngineArgs
    from vllm_iapt.config import IAPTEngineConfig

    engine_args.check_engine_args(EngineArgs(model=str(tiny_model_dir)), IAPTEngineConfig(allow_unchecked_vllm=True))


def test_mistral_architecture(tmp_path, tiny_model_dir, adapter_factory):
    """MistralForCausalLM checkpoints get the IAPT layers too, with the same parity."""
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from vllm_iapt.reference import IAPTForCausalLM

    model_dir = tmp_path / "tiny-mistral"
    model_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, model_dir / f.name)
    llama_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=llama_cfg["vocab_size"], hidden_size=128, intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                        initializer_range=0.1, sliding_window=None, bos_token_id=1, eos_token_id=2)
    base = MistralForCausalLM(cfg).eval()
    base.save_pretrained(model_dir)
    adapter = ["m", 1, str(adapter_factory("mistral-a", num_soft_tokens=3, seed=31))]
    items = [{"ids": random_ids(n, n + 5), "adapter": ad} for n in (4, 70) for ad in (None, adapter)]
    result = run_engine(tmp_path, {
        "model": str(model_dir),
        "process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "engine": {"additional_config": {"iapt": {}}},
        "inspect_layers": True,
        "batches": [{"items": items, "sampling": {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}}],
    })
    assert result["model_type"] == "IAPTMistralForCausalLM" and result["layer_types"] == ["IAPTMistralDecoderLayer"]
    for it, res in zip(items, result["batches"][0]):
        ref = IAPTForCausalLM.from_pretrained(base, it["adapter"][2] if it["adapter"] else None)
        assert res["outputs"][0]["token_ids"] == ref.generate(it["ids"], 8).token_ids
