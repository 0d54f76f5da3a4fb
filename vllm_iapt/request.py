"""The offline request type: ``IAPTRequest(name, int_id, path)``."""

from __future__ import annotations

from vllm.lora.request import LoRARequest


class IAPTRequest(LoRARequest):
    """Selects an IAPT adapter for one request, like ``LoRARequest`` does for LoRA.

    It travels through vLLM's ``lora_request`` plumbing. vLLM re-encodes it as a
    plain ``LoRARequest`` between processes, so nothing downstream relies on this
    class: the engine recognises IAPT adapters by the ``adapter_config.json`` at
    ``lora_path`` (``peft_type == "IAPT"``).
    """
