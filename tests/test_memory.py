"""IAPT's device memory inside vLLM's budget (docs/engine.md, "Memory"): the bound of
a step (vllm_iapt/engine/memory.py) against the soft-row op's measured peak, the
reservation taken from the KV cache (patches/worker_memory.py), and the adapter
manager keeping every step inside it, exactly."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_ids

from vllm_iapt.engine import memory
from vllm_iapt.toy import random_adapter

KW = {"hidden_size": 128, "num_hidden_layers": 2}


# -- the bound of one step against the soft-row op's measured peak ----------------


def _random_weights(d, r, m, activation, g):
    from vllm_iapt.generator import GeneratorWeights

    t = lambda *shape: 0.1 * torch.randn(*shape, generator=g)
    rational = activation == "rational"
    return GeneratorWeights(t(r, d), t(r), t(m, r), t(d, r), t(d), activation,
                            t(6) if rational else None, t(4) if rational else None)


def _plan_parts(d, adapters, seqs, lengths, seed=0):
    """Flattened weights and the rows of a step: ``adapters`` [(r, m, activation,
    layers)], ``seqs[g]`` sequences of group g, ``lengths(g, k)`` instruction rows."""
    g = torch.Generator().manual_seed(seed)
    groups, shapes, row = [], [], 0
    for i, (r, m, activation, layers) in enumerate(adapters):
        soft, instr, lens = [], [], []
        for k in range(seqs[i]):
            n = lengths(i, k)
            soft.append(torch.arange(row, row + m))
            instr.append(torch.arange(row + m, row + m + n))
            lens.append(n)
            row += m + n
        groups.append((_random_weights(d, r, m, activation, g).flattened("cpu"), layers, torch.cat(soft),
                       torch.cat(instr), lens))
        pq = (6, 4) if activation == "rational" else (0, 0)
        shapes.append(memory.AdapterShape(frozenset(layers), r, m, *pq))
    return groups, shapes, row


def _peak_bytes(fn) -> int:
    """Peak bytes of the tensors ``fn`` allocates (and still holds), from the
    allocation events torch's profiler records."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def measure_step(d, num_layers, adapters, seqs, lengths, max_tokens, max_seqs, dtype):
    """(measured bytes, bound) of one prefill step through the engine's soft-row op
    (``layers.write_soft_rows`` at every layer, the layouts kept in the plan's cache):
    the adapters' device weights, the plan's row tensors, the layouts and the op's
    temporaries. On a GPU the layout's index buffer is a device copy; on the CPU it is
    numpy's memory, which torch does not see, so it is added."""
    from vllm_iapt.engine.layers import write_soft_rows
    from vllm_iapt.engine.plan import AdapterGroup, StepPlan

    groups, shapes, rows = _plan_parts(d, adapters, seqs, lengths)
    assert rows <= max_tokens and sum(seqs) <= max_seqs
    hidden, residual = torch.randn(max_tokens, d).to(dtype), torch.randn(max_tokens, d).to(dtype)
    numpy_owned = []

    def step():
        plan = StepPlan([AdapterGroup(
            weights=[w if layer in layers else None for layer in range(num_layers)], soft_rows=soft.clone(),
            instruction_rows=instr.clone(), cu_seqlens=torch.tensor([0] + np.cumsum(lens).tolist()),
            segment_ids=torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
            for w, layers, soft, instr, lens in groups])
        for layer in range(num_layers):
            write_soft_rows(plan, layer, hidden, residual)
        numpy_owned.extend(layout.down_bias_idx.untyped_storage().nbytes() for layout, _ in plan.cache.values())

    workspace = _peak_bytes(step) + sum(numpy_owned)
    weights = sum(t.untyped_storage().nbytes() for w, *_ in groups for t in (w.down_weight, w.flat))
    assert weights <= sum(s.device_bytes(d) for s in shapes)
    limits = memory.StepLimits(max_tokens, max_seqs, d, num_layers, hidden.element_size(), 128)
    return weights + workspace, memory.step_bytes(shapes, limits)


T, SEQS = 2048, 256
REF = (64, 16, "rational", {0, 1})  # the default reservation's adapter (memory.reference_shape)
#: Worst cases within max_num_batched_tokens rows: max_adapters groups of the
#: reference adapter with equal and skewed rows (tile padding) and many sequences,
#: one adapter over every row, a wide adapter padding narrow ones (mixed activations),
#: groups with different generator layers (a layout per set), many one-row groups.
WORST = {
    "8 reference adapters, equal rows": ([REF] * 8, [1] * 8, lambda i, k: (T - 8 * 16) // 8),
    "8 reference adapters, skewed rows": ([REF] * 8, [1] * 8, lambda i, k: T - 8 * 16 - 7 if i == 0 else 1),
    "8 reference adapters, many sequences": ([REF] * 8, [15] * 8, lambda i, k: 1),
    "1 adapter, every row": ([REF], [1], lambda i, k: T - 16),
    "1 narrow adapter, every row": ([(8, 1, "gelu", {0, 1})], [1], lambda i, k: T - 1),
    "wide + narrow, mixed activations": ([(256, 4, "rational", {0, 1})] + [(4, 2, "gelu", {0})] * 7, [1] * 8,
                                         lambda i, k: T // 2 if i == 0 else 100),
    "generator layer subsets": ([(64, 4, "rational", {0}), (32, 8, "silu", {1}), (64, 4, "relu", {0, 1})],
                                [3, 3, 3], lambda i, k: 200),
    "32 one-row groups": ([(2, 1, "identity", {0, 1})] * 32, [1] * 32, lambda i, k: T // 32 - 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("d", [128, 576])
@pytest.mark.parametrize("case", list(WORST))
def test_step_peak_stays_within_the_bound(case, d, dtype):
    adapters, seqs, lengths = WORST[case]
    measured, bound = measure_step(d, 2, adapters, seqs, lengths, T, SEQS, dtype)
    assert measured <= bound, f"{case}: measured {measured / 2**20:.2f} MiB > bound {bound / 2**20:.2f} MiB"
    if len(adapters) == 1:  # no tiling slack: the bound is the real peak, give or take rounding
        assert measured >= 0.75 * bound, f"{case}: bound {bound / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB"


def test_adapter_device_bytes_are_the_flattened_buffers(tmp_path):
    from vllm_iapt.adapter import load_adapter

    for i, kwargs in enumerate(({"bottleneck_dim": 16}, {"bottleneck_dim": 24, "num_soft_tokens": 3,
                                                          "activation": "gelu", "layers": [0]})):
        cfg = random_adapter(tmp_path / str(i), **KW, **kwargs)
        adapter = load_adapter(tmp_path / str(i))
        flat = [adapter.layer_weights(layer).flattened("cpu") for layer in cfg.generator_layers]
        exact = sum(w.down_weight.untyped_storage().nbytes() + w.flat.untyped_storage().nbytes() for w in flat)
        got = memory.AdapterShape.of(cfg).device_bytes(128)
        assert exact <= got <= exact + 2 * memory.GRANULE * len(flat)


def test_default_reservation_is_twice_max_adapters_reference_adapters_in_one_step():
    from vllm_iapt.config import IAPTEngineConfig

    limits = memory.StepLimits(4096, 256, 576, 30, 2, 16)
    config = SimpleNamespace(
        model_config=SimpleNamespace(hf_text_config=SimpleNamespace(hidden_size=576, num_hidden_layers=30),
                                     dtype=torch.bfloat16),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=4096, max_num_seqs=256),
        cache_config=SimpleNamespace(block_size=16))
    res = memory.reservation(config, IAPTEngineConfig(max_adapters=8))
    ref = memory.AdapterShape(frozenset(range(30)), 64, 16, 6, 4)
    assert res.limits == limits and not res.explicit
    assert res.total == memory.step_bytes([ref] * 16, limits)
    assert res.reference_weights == 16 * ref.device_bytes(576)
    assert memory.reservation(config, IAPTEngineConfig(max_adapters=16)).total > res.total
    assert memory.reservation(config, IAPTEngineConfig(max_device_adapter_bytes=12345)).total == 12345
    # more rows per step, more working memory; the soft tokens of the reference follow the hit unit
    config.scheduler_config.max_num_batched_tokens = 8192
    assert memory.reservation(config, IAPTEngineConfig()).total > res.total
    config.cache_config.block_size = 4
    assert memory.reservation(config, IAPTEngineConfig()).limits.max_soft_tokens == 4


# -- the patch: reservation at start-up ------------------------------------------


def test_worker_patch_calls_straight_through_without_iapt_and_subtracts_once():
    from vllm_iapt.patches import worker_memory

    class Base:
        def determine_available_memory(self):
            return 1000

    class Sub(Base):  # an override calling the method it overrides
        def determine_available_memory(self):
            return super().determine_available_memory() - 1

    worker_memory._wrap(Base)
    wrapped = Base.__dict__["determine_available_memory"]
    worker_memory._wrap(Base)  # idempotent
    assert Base.__dict__["determine_available_memory"] is wrapped
    worker_memory._wrap(Sub)
    assert Base().determine_available_memory() == 1000  # no model runner
    off = Sub()
    off.model_runner = SimpleNamespace(iapt=None)  # IAPT off
    assert off.determine_available_memory() == 999
    calls = []
    original = worker_memory._reserve
    worker_memory._reserve = lambda worker, available: calls.append(available) or available - 10
    try:
        assert Sub().determine_available_memory() == 989 and calls == [999]  # once, on the outer result
    finally:
        worker_memory._reserve = original


# -- one in-process engine: the KV cache it reports, the byte-bounded device cache --


ADAPTER = {"bottleneck_dim": 16, "num_soft_tokens": 4}
MAX_TOKENS = 512
#: The engine's step limits (asserted against the engine's own config below).
LIMITS = memory.StepLimits(MAX_TOKENS, 256, 128, 2, 4, 128)
SHAPE = memory.AdapterShape(frozenset({0, 1}), 16, 4, 6, 4)
WEIGHTS = SHAPE.device_bytes(128)
#: Room for a step of two adapters and one more resident adapter, not for a step of three.
BUDGET = memory.step_bytes([SHAPE] * 2, LIMITS) + WEIGHTS + WEIGHTS // 2


@pytest.fixture(scope="module")
def worker_memory_patch():
    """patches/worker_memory.py applied (the plugin applies it when it builds a worker,
    too: applying it twice must subtract once)."""
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker
    from vllm_iapt.patches import worker_memory

    worker_memory.apply()
    patched = {cls: cls.__dict__["determine_available_memory"] for cls in (Worker, CPUWorker)}
    worker_memory.apply()
    assert all(getattr(f, worker_memory._MARK, False) and cls.__dict__["determine_available_memory"] is f
               for cls, f in patched.items())


@pytest.fixture(scope="module")
def llm(tiny_model_dir, tmp_path_factory, worker_memory_patch):
    from engine_harness import make_llm, shutdown

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    snaps = tmp_path_factory.mktemp("memory-snapshots")
    os.chmod(snaps, 0o700)
    llm = make_llm(str(tiny_model_dir), max_num_batched_tokens=MAX_TOKENS, additional_config={"iapt": {
        "snapshot_dir": str(snaps), "max_device_adapter_bytes": BUDGET}})
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-adapters")
    paths = {}
    for i, name in enumerate("abcde"):
        random_adapter(root / name, seed=300 + i, **KW, **ADAPTER)
        paths[name] = root / name
    random_adapter(root / "wide", seed=399, bottleneck_dim=512, **KW)
    paths["wide"] = root / "wide"
    return paths


def _manager(llm):
    from engine_harness import runner_of

    return runner_of(llm).iapt.manager


def test_kv_cache_is_smaller_by_the_reservation(llm):
    from engine_harness import runner_of

    config = llm.llm_engine.vllm_config
    worker = llm.llm_engine.model_executor.driver_worker.worker
    assert memory.StepLimits.of(config) == LIMITS  # the limits the budget above was computed for
    kv = runner_of(llm).kv_cache_config
    kv_bytes = config.cache_config.kv_cache_memory_bytes  # VLLM_CPU_KVCACHE_SPACE
    assert kv_bytes == int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) << 30
    # vLLM's block arithmetic (kv_cache_utils.get_kv_cache_config_from_groups): bytes // bytes per block
    per_block = sum(t.size for t in kv.kv_cache_tensors) // kv.num_blocks
    assert per_block == 2 * 2 * 2 * 64 * 4 * config.cache_config.block_size  # layers, K/V, heads, head dim, fp32
    assert config.cache_config.num_gpu_blocks == kv.num_blocks == (kv_bytes - BUDGET) // per_block
    assert kv.num_blocks < kv_bytes // per_block  # what the same engine without IAPT gets
    # the worker reserved it, and its adapter manager keeps every step inside it
    assert worker.iapt_reservation.total == BUDGET and worker.iapt_reservation.explicit
    assert _manager(llm).budget == BUDGET and _manager(llm).limits == LIMITS


def test_reservation_leaving_no_room_fails_start_up_naming_the_settings(llm):
    from vllm_iapt.patches import worker_memory

    from vllm_iapt.config import IAPTEngineConfig

    worker = llm.llm_engine.model_executor.driver_worker.worker
    state = SimpleNamespace(config=IAPTEngineConfig(max_device_adapter_bytes=3 << 30), manager=None)
    fake = SimpleNamespace(vllm_config=worker.vllm_config, model_runner=SimpleNamespace(iapt=state),
                           get_kv_cache_spec=worker.get_kv_cache_spec)
    with pytest.raises(ValueError, match="--iapt-max-device-adapter-bytes.*--max-num-batched-tokens.*"
                                         "VLLM_CPU_KVCACHE_SPACE"):
        worker_memory._reserve(fake, 1 << 30)
    # less than one max_model_len sequence left (512 tokens: 4 blocks of 128) fails too
    state = SimpleNamespace(config=IAPTEngineConfig(max_adapters=2), manager=None)
    fake.model_runner.iapt = state
    total = memory.reservation(worker.vllm_config, state.config).total
    with pytest.raises(ValueError, match=r"less than one sequence of max_model_len=512 needs .* --max-iapt-adapters"):
        worker_memory._reserve(fake, total + 1000)


GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def _run(llm, jobs):
    """``jobs``: [(ids, IAPTRequest | None)] added together, so that they start in one step."""
    from engine_harness import run_together

    return run_together(llm, jobs, GREEDY)


def test_byte_bounded_device_cache_evicts_and_stays_exact(llm, adapters, reference):
    from vllm_iapt import IAPTRequest

    assert memory.step_bytes([SHAPE] * 3, LIMITS) > BUDGET  # a step of three cannot fit, two can
    manager = _manager(llm)
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    request = lambda name: IAPTRequest(name, ids[name], str(adapters[name]))
    uploads, evictions = manager.num_uploads, manager.num_evictions
    needed = []  # device bytes after each admission: the step's adapters and working memory, the others resident
    get = manager.get

    def checked_get(*args):
        weights = get(*args)
        needed.append(manager._needed(manager._step))
        return weights

    manager.get = checked_get
    try:
        _run_pairs(llm, adapters, reference, request)
    finally:
        del manager.get
    assert needed and max(needed) <= BUDGET  # every step stayed inside the reservation
    assert max(needed) > BUDGET - WEIGHTS  # ... and used it: without evictions the next adapter would not fit
    assert manager.num_evictions > evictions  # evicted by bytes (max_adapters is 8)
    assert manager.num_uploads - uploads > len({n for pair in PAIRS for n in pair})  # and loaded again


PAIRS = [("a", "b"), ("c", "d"), ("a", "b"), ("e", "c"), ("d", "a")]


def _run_pairs(llm, adapters, reference, request):
    for step, pair in enumerate(PAIRS):
        prompts = [random_ids(12 + 3 * step + k, 500 + 10 * step + k) for k in range(2)]
        outs = _run(llm, [(p, request(name)) for p, name in zip(prompts, pair)] + [(prompts[0], None)])
        for out, p, name in zip(outs, prompts + [prompts[0]], list(pair) + [None]):
            want = reference.generate(p, adapters[name] if name else None, GREEDY["max_tokens"]).token_ids
            assert out.outputs[0].finish_reason == "length", out.outputs[0].stop_reason
            assert out.outputs[0].token_ids == want, (step, name)


def test_step_over_the_reservation_runs_exactly_and_too_large_alone_is_refused(llm, adapters, reference):
    """Three adapters that do not fit together in the reservation run anyway (a valid
    request never fails because others share its step; the step is counted as over
    budget), exactly; an adapter too large even alone is refused, naming the setting."""
    from vllm_iapt import IAPTRequest

    names = ["a", "b", "c", "wide"]
    prompts = [random_ids(15 + i, 600 + i) for i in range(len(names))]
    jobs = [(p, IAPTRequest(n, 20 + i, str(adapters[n]))) for i, (p, n) in enumerate(zip(prompts, names))]
    over = _manager(llm).num_over_budget
    outs = _run(llm, jobs + [(prompts[0], None)])
    for out, p, name in zip(outs[:3], prompts, names):
        assert out.outputs[0].token_ids == reference.generate(p, adapters[name], GREEDY["max_tokens"]).token_ids
    assert _manager(llm).num_over_budget > over  # the third did not fit next to the first two
    wide = outs[3].outputs[0]
    assert wide.finish_reason == "error" and "more than max_device_adapter_bytes" in wide.stop_reason, wide.stop_reason
    assert "--iapt-max-device-adapter-bytes" in wide.stop_reason
    assert outs[4].outputs[0].token_ids == reference.generate(prompts[0], None, GREEDY["max_tokens"]).token_ids