"""vllm-iapt: serve IAPT (Instance-Aware Prompt Tuning) adapters with vLLM.

The public API is only what is imported here; everything else is internal.
"""

from vllm_iapt.adapter import AdapterError, IAPTAdapter, load_adapter, save_adapter
from vllm_iapt.config import AdapterConfig

__version__ = "0.1.0"

__all__ = ["AdapterConfig", "AdapterError", "IAPTAdapter", "load_adapter", "save_adapter", "__version__"]
