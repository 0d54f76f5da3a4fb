"""Engine core: which waiting IAPT requests may start their prefill in this step.

Two rules, both of which only make a request wait a step, keeping its place in
the queue (like a LoRA request past ``max_loras``):

- **Read ahead** (``read_ahead``, :func:`reads_ahead`). The first time the
  scheduler sees an adapter (by content), it announces it to the workers on this
  step's ``SchedulerOutput`` (:data:`ANNOUNCE_ATTR`) instead of starting its
  request: each worker reads and validates the adapter's snapshot in a background
  thread while this step runs
  (:meth:`vllm_iapt.engine.adapter_manager.IAPTAdapterManager.read_ahead`), and the
  request starts in the next step, when the weights are in host memory. So a cold
  adapter's disk read and validation are not inside everybody's step; on an idle
  engine the extra step is an empty one. On a GPU the host CPU is free while a step
  runs, so the read is hidden; on a CPU device the read takes the same cores from
  the step and the held request waits a step longer for nothing
  (``benchmarks/results/cold_adapters.md``), so there it is off by default.
- **A cap on distinct adapters per step.** A step that starts prefills needs every
  one of their adapters' generator weights on the device at once
  (:mod:`vllm_iapt.engine.memory`), and the device memory IAPT reserved for that is
  sized for ``REFERENCE_STEP_FACTOR x max_adapters`` adapters. Without a cap a burst
  of new tenants would put more adapters into one step than the reservation holds,
  and the worker could only fail some of them. Unlike ``max_loras`` the cap counts
  only requests that start a prefill: decoding needs no adapter weights, so any
  number of tenants decode together.
"""

from __future__ import annotations

from typing import Any

from vllm.utils.cache import LRUCache

from vllm_iapt.engine.memory import REFERENCE_STEP_FACTOR
from vllm_iapt.engine.request_entry import iapt_entry

#: The ``SchedulerOutput`` attribute with the adapters announced in that step, as
#: ``(content hash, name, snapshot path)`` tuples (absent when none were).
ANNOUNCE_ATTR = "iapt_read_ahead"
#: Most adapters announced in one step; later first sightings in that step start
#: without a read-ahead (their worker reads them inside the step, as before).
MAX_ANNOUNCED_PER_STEP = 64
#: Adapters remembered as announced (a request whose adapter was forgotten waits one
#: more step, never longer: the bound is far above one step's announcements).
ANNOUNCED_CAPACITY = 4096


def reads_ahead(read_ahead: bool | None, device_type: str) -> bool:
    """Whether the scheduler holds a new adapter's first request for its read ahead:
    as configured, by default everywhere but on a CPU device."""
    return read_ahead if read_ahead is not None else device_type != "cpu"


class PrefillAdmission:
    """The scheduler's IAPT state: adapters announced to the workers, and the distinct
    adapters admitted into prefill in the step under way."""

    def __init__(self, max_adapters: int, read_ahead: bool) -> None:
        self.cap = REFERENCE_STEP_FACTOR * max_adapters
        self.read_ahead = read_ahead
        self._admitted: set[int] = set()
        self._step = 0
        #: content hash -> the step in which it was announced
        self._announced: LRUCache[str, int] = LRUCache(ANNOUNCED_CAPACITY)
        self._announcing: dict[str, tuple[str, str, str]] = {}

    def new_step(self) -> None:
        self._admitted.clear()
        self._step += 1

    def admit(self, request: Any) -> bool:
        """Whether ``request`` (a waiting request about to be scheduled, so a prefill
        from row 0) may start in this step; it is counted when it may."""
        lora = getattr(request, "lora_request", None)
        if lora is None or lora.lora_int_id <= 0:
            return True
        if self.read_ahead:
            entry = iapt_entry(request.sampling_params)
            if entry is not None and not self._announced_before(entry):
                return False
        if lora.lora_int_id in self._admitted:
            return True
        if len(self._admitted) >= self.cap:
            return False
        self._admitted.add(lora.lora_int_id)
        return True

    def _announced_before(self, entry: Any) -> bool:
        """Whether the workers were told about the adapter in an earlier step;
        announces it in this one if not (unless this step announced its maximum)."""
        step = self._announced.get(entry.content_hash)
        if step is not None:
            return step < self._step
        if len(self._announcing) >= MAX_ANNOUNCED_PER_STEP:
            return True
        self._announced[entry.content_hash] = self._step
        self._announcing[entry.content_hash] = (entry.content_hash, entry.name, entry.path)
        return False

    def announce(self, scheduler_output: Any) -> None:
        """Puts the adapters first seen in this step on its ``SchedulerOutput``."""
        if self._announcing:
            setattr(scheduler_output, ANNOUNCE_ATTR, list(self._announcing.values()))
            self._announcing = {}
