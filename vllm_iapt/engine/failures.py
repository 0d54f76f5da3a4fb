"""An IAPT adapter that fails in the worker fails only its own requests.

When the worker cannot load a request's adapter (its snapshot was removed or damaged
after the front end accepted the request; see :mod:`vllm_iapt.engine.snapshots`), or a
request's cached prefix ends inside its soft slots (:mod:`vllm_iapt.engine.slots_guard`),
the step plan skips that request and the adapter manager records it. The failure then
crosses vLLM's processes the way a step's results do:

* worker (:func:`attach_to_output`): the recorded failures ride on the step's
  ``ModelRunnerOutput`` (attribute :data:`FAILURES_ATTR`);
* engine core (:func:`finish_failed_requests`): before the scheduler processes the
  step, those requests are finished with ``FINISHED_ERROR`` (finish reason
  ``"error"``, the reason in ``stop_reason``), so their token of that step is never
  emitted, and their KV blocks leave the prefix cache (their soft rows were never
  written);
* front end (:class:`FailureReasons`, kept in the front end's
  :class:`~vllm_iapt.engine.frontend.IAPTFrontend`): the reason is remembered by
  request id, so the OpenAI server answers that request with it (HTTP 500 naming the
  adapter) instead of vLLM's bare "Internal server error".

Every other request of the step, and the engine, keep running: an exception in the
engine step would kill the engine core (``EngineDeadError`` for every tenant). vLLM
finishes single requests with an error from the scheduler the same way for grammars
that fail to compile and KV loads that fail.

vLLM is imported inside the functions: each runs in one process only.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

logger = logging.getLogger("vllm.iapt")

#: Attribute of ``ModelRunnerOutput`` carrying {request id: reason} from a worker to the scheduler.
FAILURES_ATTR = "iapt_failed_requests"
#: Start of every reason, so the front end recognises them in ``stop_reason``.
REASON_PREFIX = "IAPT adapter"


# -- worker ---------------------------------------------------------------------


def attach_to_output(result: Any, failures: dict[str, str]) -> tuple[Any, bool]:
    """Puts ``failures`` on the step's ``ModelRunnerOutput`` (also inside vLLM's
    async wrapper). Returns the (possibly copied) result and whether there was an
    output to carry them."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

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


# -- engine core ----------------------------------------------------------------


def finish_failed_requests(scheduler: Any, model_runner_output: Any) -> list:
    """Finishes the requests a worker reported failed (``FINISHED_ERROR``, the
    reason in ``stop_reason``) and evicts their KV blocks. Returns the finished
    requests, for :func:`add_outputs_of_failed`."""
    failures = getattr(model_runner_output, FAILURES_ATTR, None)
    if not failures:
        return []
    from vllm.v1.request import RequestStatus

    for req_id in failures:
        request = scheduler.requests.get(req_id)
        if request is None or request.is_finished():
            continue
        try:  # their soft rows were never written: no later request may hit these blocks
            blocks = {b for group in scheduler.kv_cache_manager.get_block_ids(req_id) for b in group}
            if blocks:
                scheduler.kv_cache_manager.evict_blocks(blocks)
        except Exception as e:  # noqa: BLE001
            logger.warning("IAPT: could not evict the KV blocks of failed request %s: %s", req_id, e)
        request.stop_reason = failures[req_id]
    failed = scheduler.finish_requests(list(failures), RequestStatus.FINISHED_ERROR)
    for request in failed:
        logger.error("IAPT: request %s failed: %s", request.request_id, failures[request.request_id])
    return failed


def add_outputs_of_failed(outputs: dict, failed: list) -> dict:
    """Adds one final output per failed request to the scheduler's step outputs
    (``{client index: EngineCoreOutputs}``), so each client learns its request
    finished with an error."""
    if not failed:
        return outputs
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    for request in failed:
        out = EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                               finish_reason=request.get_finished_reason(), stop_reason=request.stop_reason,
                               events=request.take_events(), trace_headers=request.trace_headers)
        eco = outputs.get(request.client_index)
        if eco is None:
            outputs[request.client_index] = eco = EngineCoreOutputs(outputs=[])
        eco.outputs.append(out)
    return outputs


# -- front end ------------------------------------------------------------------


class FailureReasons:
    """The reasons of failed IAPT requests by request id (bounded, oldest dropped)."""

    def __init__(self, capacity: int = 4096) -> None:
        from vllm.utils.cache import LRUCache

        self._reasons: LRUCache[str, str] = LRUCache(capacity)

    def record(self, out: Any, request_state: Any) -> None:
        """Remembers the reason if ``out`` (an ``EngineCoreOutput``) finished an IAPT
        request with an error, under its external request id."""
        from vllm.v1.engine import FinishReason

        if (out.finish_reason == FinishReason.ERROR and isinstance(out.stop_reason, str)
                and out.stop_reason.startswith(REASON_PREFIX)):
            self._reasons[getattr(request_state, "external_req_id", None) or out.request_id] = out.stop_reason

    def reason_for(self, request_id: str) -> str | None:
        """The reason of an OpenAI request id (its own, or a prompt's ``<id>-<i>``), if any."""
        found = self._reasons.get(request_id)
        if found is None:
            prefix = request_id + "-"
            view = self._reasons.cache  # a read-only view in LRU order: reading it does not reorder the cache
            found = next((view[k] for k in reversed(list(view)) if k.startswith(prefix)), None)
        return found
