"""The real vLLM engine (in-process) against the reference model, token for token."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import random_ids
from engine_harness import emulate_cuda_graph_dispatch, run_batch

pytestmark = pytest.mark.engine

MAX_TOKENS = 10
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapters(adapter_factory):
    """Three adapters with different m, activations, bottlenecks and layers."""
    return {
        "a": ("a", 1, str(adapter_factory("eng-a", num_soft_tokens=4, bottleneck_dim=16, activation="rational", seed=1))),
        "b": ("b", 2, str(adapter_factory("eng-b", num_soft_tokens=2, bottleneck_dim=8, activation="gelu", layers=[0], seed=2))),
        "c": ("c", 3, str(adapter_factory("eng-c", num_soft_tokens=7, bottleneck_dim=32, activation="identity", seed=3))),
        "d": ("d", 4, str(adapter_factory("eng-d", num_soft_tokens=1, bottleneck_dim=4, activation="silu", seed=4))),
    }


def engine(tiny_model_dir, compiled: bool):
    from engine_harness import make_llm

    # max_adapters=2 < the 4 adapters used together: a prefill step may need more
    # adapters than stay resident, and that must still be exact. Read-ahead on, as on
    # a GPU (off by default on a CPU device).
    return make_llm(str(tiny_model_dir), enforce_eager=not compiled,
                    additional_config={"iapt": {"max_adapters": 2, "max_cpu_adapters": 3, "read_ahead": True}})


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    """The engine most tests run against: eager, with the CUDA-graph decisions vLLM
    takes on a CUDA install emulated (test_cuda_graph_dispatch checks them)."""
    from engine_harness import shutdown

    llm = engine(tiny_model_dir, compiled=False)
    llm.cuda_graph_passes = emulate_cuda_graph_dispatch(llm)
    yield llm
    shutdown(llm)


def check_against_reference(reference, items, results, max_tokens=MAX_TOKENS):
    for it, res in zip(items, results):
        adapter = it.get("adapter")
        path = adapter[2] if adapter else None
        ref = reference.generate(it["ids"], path, max_tokens)
        got = res["outputs"][0]
        assert res["prompt_token_ids"] == it["ids"], "the soft slots leaked into prompt_token_ids"
        assert got["token_ids"] == ref.token_ids, (adapter and adapter[0], len(it["ids"]))
        for a, b in zip(got["logprobs"], ref.logprobs):
            assert math.isclose(a, b, abs_tol=2e-3), (a, b)


def test_mixed_batch_parity(llm, reference, adapters):
    lengths = [1, 2, 5, 17, 64, 129, 300]
    items = []
    for i, n in enumerate(lengths):
        for key in [None, "a", "b", "c", "d"]:
            items.append({"ids": random_ids(n, seed=100 * i + len(items)), "adapter": adapters[key] if key else None})
    results = run_batch(llm, items, GREEDY)
    check_against_reference(reference, items, results)
    # The adapters really change the outputs (otherwise parity proves little).
    ids = random_ids(20, 7)
    outs = run_batch(llm, [{"ids": ids}] + [{"ids": ids, "adapter": adapters[k]} for k in "abcd"], GREEDY)
    assert len({tuple(o["outputs"][0]["token_ids"]) for o in outs}) == 5


def test_text_prompts_and_prompt_logprobs(llm, reference, adapters, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "alpha beta gamma 3 1 2"
    items = [{"text": text, "adapter": adapters["a"]}, {"text": text}]
    results = run_batch(llm, items, {**GREEDY, "prompt_logprobs": 0})
    ids = tok(text)["input_ids"]
    for it, res in zip(items, results):
        path = it["adapter"][2] if it.get("adapter") else None
        assert res["prompt_token_ids"] == ids
        assert len(res["prompt_logprobs"]) == len(ids) and res["prompt_logprobs"][0] is None
        ref = reference.prompt_logprobs(ids, path)
        for a, b in zip(res["prompt_logprobs"][1:], ref[1:]):
            assert math.isclose(a, b, abs_tol=2e-3), (a, b)
        assert res["outputs"][0]["token_ids"] == reference.generate(ids, path, MAX_TOKENS).token_ids


def test_n_greater_than_one_and_seeded_sampling(llm, reference, adapters):
    ids = random_ids(12, 3)
    items = [{"ids": ids, "adapter": adapters["a"]}]
    # vLLM refuses n > 1 with temperature 0; top_k=1 is greedy with n > 1.
    greedy = run_batch(llm, items, {**GREEDY, "temperature": 1.0, "top_k": 1, "n": 3})[0]
    ref = reference.generate(ids, adapters["a"][2], MAX_TOKENS).token_ids
    assert [o["token_ids"] for o in greedy["outputs"]] == [ref] * 3
    sampled = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 1234, "n": 2, "ignore_eos": True}
    first = run_batch(llm, items, sampled)[0]
    again = run_batch(llm, items, sampled)[0]
    assert [o["token_ids"] for o in first["outputs"]] == [o["token_ids"] for o in again["outputs"]]
    other = run_batch(llm, [{"ids": ids, "adapter": adapters["c"]}], sampled)[0]
    assert [o["token_ids"] for o in other["outputs"]] != [o["token_ids"] for o in first["outputs"]]


def test_stop_strings(llm, reference, adapters):
    ids = random_ids(9, 11)
    item = {"ids": ids, "adapter": adapters["b"]}
    plain = run_batch(llm, [item], GREEDY)[0]["outputs"][0]
    assert plain["token_ids"] == reference.generate(ids, adapters["b"][2], MAX_TOKENS).token_ids
    text = plain["text"]
    stop = next(ch for ch in text[2:] if ch.isascii() and ch.isalnum())
    res = run_batch(llm, [item], {**GREEDY, "stop": [stop]})[0]["outputs"][0]
    assert res["finish_reason"] == "stop"
    assert res["text"] == text[: text.index(stop)]
    assert len(res["token_ids"]) < MAX_TOKENS


def test_prefix_cache_hits_only_same_adapter_and_prompt(llm, reference, adapters):
    long = random_ids(300, 42)
    a, b = adapters["a"], adapters["b"]
    first = run_batch(llm, [{"ids": long, "adapter": a}], GREEDY)[0]
    again = run_batch(llm, [{"ids": long, "adapter": a}], GREEDY)[0]
    assert again["num_cached_tokens"] > 0, "identical (adapter, prompt) should hit the prefix cache"
    assert again["outputs"][0]["token_ids"] == first["outputs"][0]["token_ids"]

    # Same prompt, another adapter or the base model: no shared blocks.
    other = run_batch(llm, [{"ids": long, "adapter": b}, {"ids": long}], GREEDY)
    assert [o["num_cached_tokens"] for o in other] == [0, 0]
    # Shared 250-token prefix, different ending, same adapter: no shared blocks.
    forked = long[:250] + random_ids(51, 5)[1:]
    fork = run_batch(llm, [{"ids": forked, "adapter": a}], GREEDY)
    assert fork[0]["num_cached_tokens"] == 0
    items = [{"ids": long, "adapter": b}, {"ids": long}, {"ids": forked, "adapter": a}]
    check_against_reference(reference, items, other + fork)

    # The base model still caches as usual.
    base_again = run_batch(llm, [{"ids": long}], GREEDY)[0]
    assert base_again["num_cached_tokens"] > 0


def test_cache_salt_is_respected(llm, adapters):
    ids = random_ids(280, 9)
    a = adapters["d"]
    run_batch(llm, [{"ids": ids, "adapter": a, "cache_salt": "tenant-1"}], GREEDY)
    same = run_batch(llm, [{"ids": ids, "adapter": a, "cache_salt": "tenant-1"}], GREEDY)[0]
    other = run_batch(llm, [{"ids": ids, "adapter": a, "cache_salt": "tenant-2"}], GREEDY)[0]
    unsalted = run_batch(llm, [{"ids": ids, "adapter": a}], GREEDY)[0]
    assert same["num_cached_tokens"] > 0
    assert other["num_cached_tokens"] == 0 and unsalted["num_cached_tokens"] == 0
    assert same["outputs"][0]["token_ids"] == other["outputs"][0]["token_ids"] == unsalted["outputs"][0]["token_ids"]


def test_new_weights_under_the_same_name_never_reuse_old_kv(llm, reference, adapters, adapter_factory, tmp_path):
    ids = random_ids(290, 21)
    path = tmp_path / "swap"
    shutil.copytree(adapters["a"][2], path)
    req = ("swap", 9, str(path))
    run_batch(llm, [{"ids": ids, "adapter": req}], GREEDY)
    shutil.rmtree(path)
    shutil.copytree(adapters["c"][2], path)  # new content, same name/id/path
    res = run_batch(llm, [{"ids": ids, "adapter": req}], GREEDY)
    assert res[0]["num_cached_tokens"] == 0
    check_against_reference(reference, [{"ids": ids, "adapter": adapters["c"]}], res)


@pytest.mark.parametrize("problem", ["missing", "nan", "other-base", "lora"])
def test_bad_adapter_is_refused_at_admission_and_running_requests_go_on(llm, reference, adapters, adapter_factory,
                                                                        tmp_path, problem):
    """A bad adapter is refused when its request is added (front end, before the
    engine sees it), naming what is wrong; a request already running is untouched
    and the engine keeps serving. (A failure that only shows in the worker, inside
    a mixed batch, is test_integrity.py::test_worker_failure_fails_only_that_adapters_requests.)"""
    if problem == "missing":
        bad, match = tmp_path / "nope", "does not exist"
    elif problem == "nan":
        from safetensors.torch import load_file, save_file

        bad = tmp_path / "nan"
        shutil.copytree(adapters["a"][2], bad)
        t = load_file(bad / "adapter_model.safetensors")
        t["layers.1.up.weight"][0, 0] = float("nan")
        save_file(t, bad / "adapter_model.safetensors")
        match = "non-finite"
    elif problem == "other-base":
        bad, match = adapter_factory("eng-other", hidden_size=64), "another base model"
    else:
        bad = tmp_path / "lora"
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        match = "peft_type is 'LORA'"

    engine = llm.llm_engine
    from vllm import SamplingParams

    from vllm_iapt import IAPTRequest

    good_ids = random_ids(30, 77)
    params = SamplingParams(**GREEDY)
    engine.add_request("good-in-flight", {"type": "token", "prompt_token_ids": good_ids}, params,
                       lora_request=IAPTRequest(*adapters["a"]))
    engine.step()  # the good request is now running
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", {"type": "token", "prompt_token_ids": random_ids(8, 1)}, params,
                           lora_request=IAPTRequest("bad", 99, str(bad)))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    (good,) = finished.values()
    assert list(good.outputs[0].token_ids) == reference.generate(good_ids, adapters["a"][2], MAX_TOKENS).token_ids
    # And the engine keeps serving.
    check_against_reference(reference, [{"ids": good_ids}], run_batch(llm, [{"ids": good_ids}], GREEDY))


def test_prompt_too_long_with_soft_slots(llm, adapters):
    with pytest.raises(ValueError, match="soft tokens of IAPT adapter 'c' does not fit max_model_len=512"):
        run_batch(llm, [{"ids": random_ids(508, 1), "adapter": adapters["c"]}], GREEDY)
    # The same prompt fits without the adapter.
    assert run_batch(llm, [{"ids": random_ids(508, 1)}], {**GREEDY, "max_tokens": 2})[0]["outputs"][0]["token_ids"]


def test_chunked_prefill_is_off(llm):
    sched = llm.llm_engine.vllm_config.scheduler_config
    assert sched.enable_chunked_prefill is False
    assert sched.max_num_batched_tokens >= llm.llm_engine.vllm_config.model_config.max_model_len
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True


def test_adapter_residency_is_bounded_and_uploads_once(llm, adapters):
    manager = llm.llm_engine.model_executor.driver_worker.worker.model_runner.iapt.manager
    ids = random_ids(16, 5)
    # Four adapters prefill in one step although only two stay resident.
    run_batch(llm, [{"ids": ids, "adapter": adapters[k]} for k in "abcd"], GREEDY)
    assert len(manager.resident()) <= 2
    before = manager.num_uploads
    run_batch(llm, [{"ids": ids, "adapter": adapters["a"]}], GREEDY)
    run_batch(llm, [{"ids": random_ids(40, 6), "adapter": adapters["a"]}], GREEDY)
    assert manager.num_uploads - before <= 1  # resident after its first use


def test_penalties_see_the_user_prompt_only(llm, reference, adapters):
    """Repetition, presence and frequency penalties give the reference's tokens:
    the soft slots' placeholder ids (a real token id) never count as prompt tokens."""
    penalties = {"repetition_penalty": 1.8, "presence_penalty": 0.6, "frequency_penalty": 0.4}
    # Prompts full of the placeholder id 0, which the slots also carry.
    items = [{"ids": [1] + [0, 5, 0, 9] * (k + 1), "adapter": adapters[key] if key else None}
             for k, key in enumerate([None, "a", "b", "c"])]
    results = run_batch(llm, items, {**GREEDY, **penalties})
    for it, res in zip(items, results):
        path = it["adapter"][2] if it["adapter"] else None
        ref = reference.model(path).generate(it["ids"], MAX_TOKENS, repetition_penalty=1.8, presence_penalty=0.6,
                                             frequency_penalty=0.4)
        assert res["outputs"][0]["token_ids"] == ref.token_ids, it["adapter"]
    # The penalties matter here: without them the tokens differ.
    plain = run_batch(llm, items, GREEDY)
    assert any(p["outputs"][0]["token_ids"] != r["outputs"][0]["token_ids"] for p, r in zip(plain, results))

    # What the penalties see of a running IAPT request: its prompt, never the slots.
    from vllm import SamplingParams

    from vllm_iapt import IAPTRequest

    engine = llm.llm_engine
    runner = engine.model_executor.driver_worker.worker.model_runner
    ids = random_ids(9, 3)
    engine.add_request("pen", {"type": "token", "prompt_token_ids": ids}, SamplingParams(**GREEDY, **penalties),
                       lora_request=IAPTRequest(*adapters["c"]))
    engine.step()
    batch = runner.input_batch
    (index,) = [i for i, r in enumerate(batch.req_ids) if r.startswith("pen")]  # vLLM may suffix the id
    row = batch.sampling_metadata.prompt_token_ids[index].tolist()
    m = 7  # adapter c
    assert row[: m + len(ids)] == [batch.vocab_size] * m + ids
    while engine.has_unfinished_requests():
        engine.step()


def test_beam_search_with_an_adapter_is_refused(llm, adapters):
    from vllm.sampling_params import BeamSearchParams

    from vllm_iapt import IAPTRequest

    params = BeamSearchParams(beam_width=2, max_tokens=4)
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="beam search is not supported with IAPT adapters"):
        llm.beam_search([{"prompt_token_ids": random_ids(6, 1)}], params, lora_request=IAPTRequest(*adapters["a"]))
    # The base model's beam search is vLLM's, unchanged.
    out = llm.beam_search([{"prompt_token_ids": random_ids(6, 1)}], params)
    assert len(out[0].sequences) == 2


def test_runner_and_layers_in_use(llm):
    """The engine runs vLLM's model runner V1 (the CPU runner is one) with IAPT
    layers, eager as asked."""
    from vllm.config import CompilationMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    assert isinstance(runner, GPUModelRunner)
    assert runner.iapt is not None and runner.iapt.num_layers == 2
    assert llm.llm_engine.vllm_config.compilation_config.mode == CompilationMode.NONE
    assert all(type(layer).__name__ == "IAPTLlamaDecoderLayer" for layer in runner.get_model().model.layers)


def test_a_burst_of_new_adapters_is_spread_over_steps(llm, reference, adapter_factory):
    """More distinct adapters arrive at once than one step may start (2 x max_adapters
    = 4 here, what IAPT reserved device memory for): the scheduler starts at most 4
    per step, the others wait a step, and every request is served exactly."""
    from vllm_iapt.engine.admission import PrefillAdmission

    cap = PrefillAdmission(2, read_ahead=True).cap
    burst = [(f"burst-{i}", 50 + i, str(adapter_factory(f"eng-burst-{i}", num_soft_tokens=2 + i % 3, seed=80 + i)))
             for i in range(3 * cap)]
    items = [{"ids": random_ids(6 + i, 1200 + i), "adapter": ad} for i, ad in enumerate(burst)]
    first = len(llm.cuda_graph_passes)
    results = run_batch(llm, items, GREEDY)
    check_against_reference(reference, items, results)
    planned = [p["groups"] for p in llm.cuda_graph_passes[first:] if p["planned"]]
    assert max(planned) == cap and sum(planned) == len(burst), planned


def test_a_new_adapter_is_read_ahead_of_the_step_that_starts_it(llm, reference, adapters, adapter_factory):
    """With read-ahead (the default on a GPU, set here): the first request of an
    adapter the engine has not seen waits one step, in which each worker reads,
    checks and packs the adapter in a background thread (the scheduler announced it
    on that step's SchedulerOutput); the step that starts the request finds it in
    host memory, so no step reads it. A request already decoding goes on meanwhile,
    and every answer is exact."""
    from vllm import SamplingParams

    from engine_harness import runner_of
    from vllm_iapt import IAPTRequest

    engine, manager = llm.llm_engine, runner_of(llm).iapt.manager
    long = {**GREEDY, "max_tokens": 3 * MAX_TOKENS}
    warm_ids = random_ids(12, 160)
    engine.add_request("ahead-warm", {"type": "token", "prompt_token_ids": warm_ids}, SamplingParams(**long),
                       lora_request=IAPTRequest(*adapters["a"]))
    while not any(out.request_id == "ahead-warm" for out in engine.step()):
        pass
    ahead, in_step = manager.num_read_ahead, manager.num_read_in_step
    fresh = [(f"ahead-{i}", 60 + i, str(adapter_factory(f"eng-ahead-{i}", num_soft_tokens=3, seed=150 + i)))
             for i in range(3)]
    prompts = [random_ids(7 + i, 170 + i) for i in range(len(fresh))]
    for i, (prompt, adapter) in enumerate(zip(prompts, fresh)):
        engine.add_request(f"ahead-{i}", {"type": "token", "prompt_token_ids": prompt}, SamplingParams(**GREEDY),
                           lora_request=IAPTRequest(*adapter))
    first = engine.step()  # announces the three adapters; only the warm request runs
    assert [out.request_id for out in first] == ["ahead-warm"], [out.request_id for out in first]
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    assert manager.num_read_ahead - ahead == len(fresh) and manager.num_read_in_step == in_step
    assert list(done["ahead-warm"].outputs[0].token_ids) == \
        reference.generate(warm_ids, adapters["a"][2], 3 * MAX_TOKENS).token_ids
    for i, (prompt, adapter) in enumerate(zip(prompts, fresh)):
        assert list(done[f"ahead-{i}"].outputs[0].token_ids) == reference.generate(prompt, adapter[2], MAX_TOKENS).token_ids


def test_read_ahead_is_on_by_default_except_on_a_cpu_device(llm):
    from vllm_iapt.engine.admission import reads_ahead

    assert reads_ahead(None, "cuda") and reads_ahead(None, "xpu") and not reads_ahead(None, "cpu")
    assert reads_ahead(True, "cpu") and not reads_ahead(False, "cuda")
    assert llm.llm_engine.engine_core.engine_core.scheduler.iapt.read_ahead  # set on here


def test_cuda_graph_dispatch(llm, reference, adapters):
    """With vLLM's CUDA-graph decisions (FULL_AND_PIECEWISE, emulated on the eager
    engine): IAPT requests are not LoRA to the dispatcher, a pass that starts an
    IAPT prefill is never FULL, and IAPT decode batches replay FULL graphs like
    base-model decodes. Runs last in the module, after every other test's steps."""
    passes = llm.cuda_graph_passes
    items = [{"ids": random_ids(n, 900 + n), "adapter": adapters[k] if k else None}
             for n, k in [(3, "a"), (9, "b"), (20, None)]]
    check_against_reference(reference, items, run_batch(llm, items, GREEDY))
    planned = [p for p in passes if p["planned"]]
    iapt_decodes = [p for p in passes if p["iapt_requests"] and p["uniform_decode"]]
    assert planned and iapt_decodes, "the tests above ran no IAPT prefill or no IAPT decode step"
    assert all(p["mode"] != "FULL" for p in planned), planned
    # Within the largest captured size a planned pass replays piecewise graphs
    # (above it vLLM runs eager, as for any batch).
    assert {p["mode"] for p in planned if p["num_tokens"] <= 512} == {"PIECEWISE"}, planned
    assert {p["mode"] for p in iapt_decodes} == {"FULL"}, iapt_decodes
