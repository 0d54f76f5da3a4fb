"""IAPT adapters in the server's Prometheus ``/metrics``.

``vllm:lora_requests_info``, the gauge adapter-aware routers read (llm-d's inference
extension, production-stack, ...), lists IAPT adapters like LoRA adapters: its
labels ``running_lora_adapters`` / ``waiting_lora_adapters`` name the adapters of
running and waiting requests (the front end's ``LoRARequestStates`` tracks every
request with a ``LoRARequest``, which IAPT requests carry), ``max_lora`` is IAPT's
device slots (``max_adapters``). vLLM creates the gauge only with vLLM LoRA on, so
:func:`add_adapter_info_gauge` creates it under IAPT (``patches/metrics.py``).

The API server also counts requests per adapter:
``vllm_iapt:requests_total{model_name=<base model>, adapter=<adapter>}``, where
base-model requests carry the base model's name as ``adapter`` (an adapter can
never have a served base model's name). Counted when the request enters the
engine (once per prompt; ``n > 1`` is one request, as in vLLM's own counters).

vLLM's own token counters count the user's tokens only: the scheduler's prefill
statistics of an IAPT request are reduced by its soft slots in the front end
(:func:`exclude_soft_slots`, applied by ``patches/output_processor.py``), so
``vllm:prompt_tokens_total``, ``vllm:prompt_tokens_by_source``, the cached-token
counts and ``vllm:request_prompt_tokens`` never include them.
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


def exclude_soft_slots(prefill_stats, m: int) -> None:
    """Removes a request's ``m`` soft slots from vLLM's ``PrefillStats`` (in place).
    A prefix-cache hit covers all slots or none (hits are whole blocks and
    ``m`` <= block size), so the slots were either all cached or all computed."""
    s = prefill_stats
    slots_cached = s.num_local_cached_tokens >= m
    s.num_prompt_tokens = max(0, s.num_prompt_tokens - m)
    if slots_cached:
        s.num_cached_tokens = max(0, s.num_cached_tokens - m)
        s.num_local_cached_tokens = max(0, s.num_local_cached_tokens - m)
    else:
        s.num_computed_tokens = max(0, s.num_computed_tokens - m)
        s.num_cache_creation_tokens = max(0, s.num_cache_creation_tokens - m)


def add_adapter_info_gauge(stat_logger, max_adapters: int) -> None:
    """Creates ``vllm:lora_requests_info`` on a ``PrometheusStatLogger`` built without
    vLLM LoRA, exactly as vLLM does with LoRA on (the same name, labels and
    multiprocess mode; vLLM's ``record`` then fills it every step)."""
    if getattr(stat_logger, "gauge_lora_info", None) is not None:
        return
    stat_logger.labelname_max_lora = "max_lora"
    stat_logger.labelname_waiting_lora_adapters = "waiting_lora_adapters"
    stat_logger.labelname_running_lora_adapters = "running_lora_adapters"
    stat_logger.max_lora = max_adapters
    stat_logger.gauge_lora_info = stat_logger._gauge_cls(
        name="vllm:lora_requests_info",
        documentation="Running stats on lora requests.",
        multiprocess_mode="sum",
        labelnames=[stat_logger.labelname_max_lora, stat_logger.labelname_waiting_lora_adapters,
                    stat_logger.labelname_running_lora_adapters],
    )
