"""vllm-iapt: serve IAPT (Instance-Aware Prompt Tuning) adapters with vLLM.

The public API is only what is imported here; everything else is internal.
"""

from vllm_iapt.adapter import AdapterError, IAPTAdapter, load_adapter, save_adapter
from vllm_iapt.config import AdapterConfig, IAPTEngineConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterError", "IAPTAdapter", "IAPTEngineConfig", "IAPTRequest",
    "load_adapter", "save_adapter", "__version__",
]


def __getattr__(name: str):
    # IAPTRequest subclasses vLLM's LoRARequest; import vLLM only when asked
    # (the trainer and the reference model do not need it).
    if name == "IAPTRequest":
        from vllm_iapt.request import IAPTRequest

        return IAPTRequest
    raise AttributeError(name)
