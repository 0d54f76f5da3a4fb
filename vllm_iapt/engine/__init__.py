"""The vLLM side of vllm-iapt (plugin, layers, adapter manager)."""
