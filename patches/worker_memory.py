"""Patch (worker): IAPT's device memory is taken out of the KV cache before vLLM sizes it.

What: ``Worker.determine_available_memory`` (``vllm/v1/worker/gpu_worker.py``; the
XPU worker inherits it) and the CPU worker's override
(``CPUWorker.determine_available_memory``, ``vllm/v1/worker/cpu_worker.py``) return
vLLM's KV-cache bytes minus IAPT's reservation
(:func:`vllm_iapt.engine.memory.reservation`: ``max_device_adapter_bytes``, or by
default what a prefill step with ``2 x max_adapters`` adapters of bottleneck 64 needs
in weights and generator working memory at ``max_num_batched_tokens`` rows), log
what they reserved, and hand the same figure to the worker's adapter manager
(:meth:`~vllm_iapt.engine.adapter_manager.IAPTAdapterManager.configure_memory`),
which admits a step's adapters only within it. If what is left cannot hold one
``max_model_len`` sequence, start-up fails with a message naming the settings to
lower.

Why: vLLM sizes the KV cache from a profiling forward (``profile_run``) that has no
IAPT plan, so neither the adapters' device weights (uploaded later, on demand) nor
the soft-row op's temporaries are in the profile; on a GPU with little headroom a
step that loads adapters could run out of memory mid-serving. On the CPU backend
the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` (``kv_cache_memory_bytes``) and the same
subtraction applies, so IAPT stays inside the memory the operator gave the engine.
An explicit ``kv_cache_memory_bytes`` on a GPU is treated the same way: it is the
budget of the KV cache and of IAPT's adapters together.

How: wraps both methods (the CPU one only on vLLM's CPU platform: importing
``cpu_worker`` replaces CUDA APIs of ``torch``); each calls straight through when
the worker's runner has no IAPT state (IAPT off) and subtracts once when one calls
the other. ``num_gpu_blocks_override`` still fixes the number of blocks, as vLLM
does.

Checked on: vLLM 0.32.0 (vllm-cpu: ``CPUWorker`` with ``VLLM_CPU_KVCACHE_SPACE``,
eager and compiled). The GPU ``Worker``'s method is wrapped the same way but has not
run on a GPU.

Goes away when: vLLM lets a plugin declare device memory outside the model's
profile (a reservation hook in ``determine_available_memory``), or IAPT allocates
its adapter cache and generator workspace before the profiling run.
"""

from __future__ import annotations

import functools
import logging

from vllm.v1.worker.gpu_worker import Worker

from vllm_iapt.engine import memory

logger = logging.getLogger("vllm.iapt")

_MARK = "__iapt_reserves_memory__"
_ACTIVE = "_iapt_reserving_memory"
_GIB = 1 << 30


def _one_sequence_bytes(worker) -> int:
    """KV-cache bytes one ``max_model_len`` sequence needs (vLLM's own start-up
    check), or 0 if that cannot be asked here."""
    try:
        from vllm.v1.core.kv_cache_utils import max_memory_usage_bytes

        return int(max_memory_usage_bytes(worker.vllm_config, worker.get_kv_cache_spec().values()))
    except Exception:  # noqa: BLE001 - vLLM checks it again itself
        return 0


def _reserve(worker, available: int) -> int:
    state = getattr(getattr(worker, "model_runner", None), "iapt", None)
    if state is None:
        return available
    res = memory.reservation(worker.vllm_config, state.config)
    left = available - res.total
    needed = _one_sequence_bytes(worker)
    if left <= 0 or left < needed:
        max_model_len = worker.vllm_config.model_config.max_model_len
        lower = ("--iapt-max-device-adapter-bytes" if res.explicit else
                 "--max-iapt-adapters (max_adapters) or set --iapt-max-device-adapter-bytes")
        raise ValueError(
            f"IAPT reserves {res.total / _GIB:.3f} GiB of device memory for adapters ({res.describe()}), which leaves "
            f"{max(left, 0) / _GIB:.3f} GiB of the {available / _GIB:.3f} GiB vLLM found for the KV cache, less than "
            f"one sequence of max_model_len={max_model_len} needs ({needed / _GIB:.3f} GiB). Lower {lower}, or "
            "--max-num-batched-tokens / --max-model-len, or give the engine more memory (--gpu-memory-utilization, "
            "--kv-cache-memory-bytes; VLLM_CPU_KVCACHE_SPACE on CPU)")
    state.manager.configure_memory(res.limits, res.total)
    worker.iapt_reservation = res
    if isinstance(getattr(worker, "available_kv_cache_memory_bytes", None), (int, float)):
        worker.available_kv_cache_memory_bytes -= res.total  # the GPU worker logs it later as "in use"
    logger.info("IAPT: %.3f GiB of the %.3f GiB for the KV cache reserved for adapters (%s); %.3f GiB left for "
                "the KV cache", res.total / _GIB, available / _GIB, res.describe(), left / _GIB)
    return left


def _wrap(cls: type) -> None:
    original = cls.__dict__["determine_available_memory"]
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def determine_available_memory(self, *args, **kwargs):
        if getattr(self, _ACTIVE, False):  # an override calling the method it overrides: subtract once
            return original(self, *args, **kwargs)
        setattr(self, _ACTIVE, True)
        try:
            available = original(self, *args, **kwargs)
        finally:
            setattr(self, _ACTIVE, False)
        return _reserve(self, available)

    setattr(determine_available_memory, _MARK, True)
    cls.determine_available_memory = determine_available_memory


def apply() -> None:
    _wrap(Worker)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        if "determine_available_memory" in CPUWorker.__dict__:
            _wrap(CPUWorker)
