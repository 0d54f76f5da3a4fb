"""The ``vllm.general_plugins`` entry point, run once in every vLLM process
(front end, engine core, workers).

It registers the IAPT-capable LLaMA and Mistral model classes and applies the
patches in ``patches/``. Both are inert unless an engine is started with
``additional_config={"iapt": {...}}``: without it the model classes build
vLLM's stock layers and every patch calls straight through.
"""

from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from vllm import ModelRegistry

    from vllm_iapt import patches

    ModelRegistry.register_model("LlamaForCausalLM", "vllm_iapt.engine.model:IAPTLlamaForCausalLM")
    ModelRegistry.register_model("MistralForCausalLM", "vllm_iapt.engine.model:IAPTMistralForCausalLM")
    patches.apply_all()
    _done = True
