"""Worker-side guard: no request may compute on top of a prefix that ends inside
its soft slots.

The generators write a request's ``m`` soft rows only in the step in which it
prefills from row 0 (:mod:`vllm_iapt.engine.plan`). A request whose computed
prefix ends inside the slots (``0 < num_computed < m``) would have rows
``num_computed .. m-1`` computed as the placeholder token and every later token
would attend to them: silently wrong. The front end prevents it by refusing
adapters with more soft tokens than the engine's prefix-cache unit
(:func:`vllm_iapt.engine.frontend.prefix_hit_unit`), and vLLM 0.32 lands hits of
attention-only models on whole scheduler blocks; this guard is the second line for
whatever else produces such a prefix (a finer hash unit than the front end knew of,
a KV connector, a future vLLM). Such requests are failed with a reason through the
adapter manager's ``record_failures`` (:mod:`vllm_iapt.engine.failures`): the
scheduler finishes them with an error before their token is emitted and evicts
their blocks; every other request runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vllm_iapt.engine.request_entry import iapt_entry


def fail_hits_inside_slots(
    req_ids: list[str],
    lora_ids: np.ndarray,
    num_computed: np.ndarray,
    sampling_params_of: Callable[[str], Any],
    num_prompt_tokens: np.ndarray | None = None,
) -> dict[str, str]:
    """``{request id: reason}`` for the IAPT requests whose computed prefix ends
    inside their soft slots (``0 < num_computed < m``).

    The arrays are per request in batch order, as :func:`build_plan` gets them.
    ``num_prompt_tokens`` (optional, counting the slots) only narrows the search to
    requests still in their prompt (a prefix inside the slots is always inside the
    prompt), so decode-only steps cost one vectorised test.
    """
    candidates = (lora_ids > 0) & (num_computed > 0)
    if num_prompt_tokens is not None:
        candidates &= num_computed < num_prompt_tokens
    failures: dict[str, str] = {}
    for i in np.flatnonzero(candidates).tolist():
        entry = iapt_entry(sampling_params_of(req_ids[i]))
        if entry is None:
            continue
        m, computed = entry.m, int(num_computed[i])
        if computed < m:
            failures[req_ids[i]] = (
                f"IAPT adapter {entry.name!r}: the request's cached prefix ends at token {computed}, "
                f"inside its {m} soft slots, whose rows {computed}..{m - 1} would never be written; the request "
                "was not run (the prefix-cache unit must be at least num_soft_tokens; see docs/engine.md)")
    return failures
