"""Per-adapter request counts in the server's Prometheus ``/metrics``.

vLLM's LoRA metrics (``vllm:lora_requests_info``) come from the scheduler's LoRA
bookkeeping, which is off under IAPT, so the API server counts requests itself:
``vllm_iapt:requests_total{model_name=<base model>, adapter=<adapter>}``, where
base-model requests carry the base model's name as ``adapter`` (an adapter can
never have a served base model's name). Counted when the request enters the
engine (once per prompt; ``n > 1`` is one request, as in vLLM's own counters).
"""

from __future__ import annotations

from prometheus_client import Counter

_requests: Counter | None = None


def count_request(model_name: str, adapter: str | None) -> None:
    global _requests
    if _requests is None:
        # Created on first use, in the API-server process only, in the default
        # registry that vLLM's /metrics serves (prometheus multiprocess mode
        # included: the client library handles it from the environment).
        _requests = Counter("vllm_iapt:requests", "Requests admitted to the engine, by IAPT adapter",
                            labelnames=["model_name", "adapter"])
    _requests.labels(model_name=model_name, adapter=adapter or model_name).inc()
