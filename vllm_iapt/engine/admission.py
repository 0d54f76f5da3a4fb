"""Engine core: how many distinct IAPT adapters may start a prefill in one step.

A step that starts prefills needs every one of their adapters' generator weights
on the device at once (:mod:`vllm_iapt.engine.memory`), and the device memory IAPT
reserved for that is sized for ``REFERENCE_STEP_FACTOR x max_adapters`` adapters.
Without a cap a burst of new tenants would put more adapters into one step than
the reservation holds, and the worker could only fail some of them. So the
scheduler, which decides what starts when, admits at most that many distinct
adapters per step into prefill; a request of a further adapter simply waits for
the next step, keeping its place in the queue, like a LoRA request past
``max_loras``. Unlike ``max_loras`` the cap counts only requests that start a
prefill: decoding needs no adapter weights, so any number of tenants decode
together.
"""

from __future__ import annotations

from typing import Any

from vllm_iapt.engine.memory import REFERENCE_STEP_FACTOR


class PrefillAdmission:
    """Distinct adapters admitted into prefill in the scheduler step under way."""

    def __init__(self, max_adapters: int) -> None:
        self.cap = REFERENCE_STEP_FACTOR * max_adapters
        self._admitted: set[int] = set()

    def new_step(self) -> None:
        self._admitted.clear()

    def admit(self, request: Any) -> bool:
        """Whether ``request`` (a waiting request about to be scheduled, so a prefill
        from row 0) may start in this step; it is counted when it may."""
        lora = getattr(request, "lora_request", None)
        if lora is None or lora.lora_int_id <= 0:
            return True
        if lora.lora_int_id in self._admitted:
            return True
        if len(self._admitted) >= self.cap:
            return False
        self._admitted.add(lora.lora_int_id)
        return True
