"""How a step holding IAPT requests is dispatched to CUDA graphs.

vLLM decides per step which captured CUDA graph replays it
(``GPUModelRunner._determine_batch_execution_and_padding`` asks
``CudagraphDispatcher.dispatch``). Two facts of IAPT must reach that decision
*before* it is taken, because a wrong answer found afterwards can only be raised
inside ``execute_model``, which kills every tenant of the engine:

* IAPT requests travel in ``lora_request``, so vLLM counts them as active LoRA
  adapters (``input_batch.lora_id_to_lora_request``). vLLM LoRA is never on with
  IAPT, graphs are captured without LoRA keys, and the dispatcher asserts
  ``lora_config is not None`` on ``has_lora=True``: on a CUDA install with
  vLLM's defaults that was every step holding an adapter request. IAPT adds no
  per-token adapter compute to the graphed layers, so the step is dispatched as
  the same step without adapters would be.
* A step that starts an IAPT prefill (it has a plan) must run the soft-row op,
  which is a graph-splitting op: piecewise graphs or eager run it, a FULL graph
  would replay the captured step and skip it. Such a step is never a uniform
  decode batch (its prompt has at least ``m + 1`` rows), so with the modes
  start-up accepts it never gets FULL; it is dispatched as non-uniform anyway,
  and if the dispatcher still answered FULL it is re-dispatched eager.

Decode steps of IAPT requests (no plan) therefore replay FULL graphs exactly as
base-model decodes do, which is where IAPT's serving advantage comes from.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from vllm.config import CUDAGraphMode

logger = logging.getLogger("vllm.iapt")


def dispatch_step(determine: Callable[..., tuple], has_plan: bool, kwargs: dict[str, Any]) -> tuple:
    """Calls vLLM's ``_determine_batch_execution_and_padding`` (``determine``) with
    IAPT's facts: no LoRA, and no FULL graph for a step with a plan."""
    if kwargs.get("force_has_lora") is None:  # vLLM's own capture runs pass it explicitly
        kwargs["force_has_lora"] = False
        kwargs["force_num_active_loras"] = 0
    if not has_plan:
        return determine(**kwargs)
    kwargs["force_uniform_decode"] = False
    result = determine(**kwargs)
    if result[0] == CUDAGraphMode.FULL:
        logger.warning("IAPT: a step that starts an IAPT prefill was offered a FULL CUDA graph; running it eager")
        kwargs["force_eager"] = True
        result = determine(**kwargs)
    return result
