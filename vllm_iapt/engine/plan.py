"""The per-step IAPT plan: which rows of this step's batch are soft slots and
instruction rows, grouped by adapter.

Built once per step in the model runner (from the InputBatch, on the CPU, no
device sync) and handed to the layers the way attention metadata is: in vLLM's
forward context (``additional_kwargs``), read inside the soft-row custom op, so a
compiled graph never bakes in a plan. A step in which no IAPT request starts its
prefill has no plan, so decode steps do no IAPT work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.forward_context import get_forward_context, is_forward_context_available

from vllm_iapt.engine.adapter_manager import DeviceAdapter, IAPTAdapterManager
from vllm_iapt.engine.request_entry import IAPTEntry, iapt_entry
from vllm_iapt.engine.slots_guard import fail_hits_inside_slots


@dataclass
class AdapterGroup:
    """The sequences of one adapter that prefill from row 0 in this step."""

    weights: DeviceAdapter  # per layer
    soft_rows: torch.Tensor  # (sum m,) rows of the soft slots, sequence-major
    instruction_rows: torch.Tensor  # (sum n,) rows of the instructions, packed
    cu_seqlens: torch.Tensor  # (B + 1,) offsets into instruction_rows
    segment_ids: torch.Tensor  # (sum n,) sequence index of each instruction row (same for every layer)


@dataclass
class StepPlan:
    groups: list[AdapterGroup]
    #: Data the layers derive from the plan once per step and share (e.g. the grouped layout).
    cache: dict = field(default_factory=dict, repr=False, compare=False)


#: Key of the plan in ``ForwardContext.additional_kwargs``.
FORWARD_CONTEXT_KEY = "iapt_plan"


def current_plan() -> StepPlan | None:
    """This forward pass's plan, or None (no forward context, a dummy or
    profiling run, or no IAPT prefill in this step)."""
    if not is_forward_context_available():
        return None
    return get_forward_context().additional_kwargs.get(FORWARD_CONTEXT_KEY)


def publish(plan: StepPlan | None) -> None:
    """Puts ``plan`` into the current forward context (call inside it)."""
    get_forward_context().additional_kwargs[FORWARD_CONTEXT_KEY] = plan


def build_plan(
    manager: IAPTAdapterManager,
    req_ids: list[str],
    lora_ids: np.ndarray,
    num_computed: np.ndarray,
    num_prompt_tokens: np.ndarray,
    num_scheduled: np.ndarray,
    sampling_params_of,
    device: torch.device,
) -> StepPlan | None:
    """``lora_ids``, ``num_computed``, ``num_prompt_tokens`` and ``num_scheduled``
    are per request in batch order (the order of the rows); ``num_prompt_tokens``
    counts the soft slots. ``sampling_params_of(req_id)`` gives a request's params."""
    inside = fail_hits_inside_slots(req_ids, lora_ids, num_computed, sampling_params_of, num_prompt_tokens)
    if inside:  # the adapter itself is fine: no content hash
        manager.record_failures(inside)
    if manager.failed_hashes:
        _fail_cache_hits_of_failed_adapters(manager, req_ids, lora_ids, num_computed, num_prompt_tokens,
                                            sampling_params_of)
    starting = np.flatnonzero((lora_ids > 0) & (num_computed == 0))
    if starting.size == 0:
        return None
    row_start = np.cumsum(num_scheduled) - num_scheduled
    by_adapter: dict[str, tuple[IAPTEntry, list[np.ndarray], list[np.ndarray], list[int], list[str]]] = {}
    for i in starting.tolist():
        extra = iapt_entry(sampling_params_of(req_ids[i]))
        if extra is None:
            continue
        m, prompt_len, start = extra.m, int(num_prompt_tokens[i]), int(row_start[i])
        if num_scheduled[i] < prompt_len:
            raise RuntimeError(
                f"IAPT request {req_ids[i]} was scheduled with {num_scheduled[i]} of its {prompt_len} prompt "
                "rows: IAPT prompts must never be prefilled in chunks (is chunked prefill on?)")
        entry = by_adapter.setdefault(extra.content_hash, (extra, [], [], [], []))
        entry[1].append(np.arange(start, start + m))
        entry[2].append(np.arange(start + m, start + prompt_len))
        entry[3].append(prompt_len - m)
        entry[4].append(req_ids[i])
    loaded: dict[str, object] = {}
    for content_hash, (extra, _, _, _, group_req_ids) in by_adapter.items():
        try:
            loaded[content_hash] = manager.get(content_hash, extra.name, extra.path)
        except Exception as e:  # noqa: BLE001 - fails this adapter's requests only (vllm_iapt/engine/failures.py)
            reason = _reason(extra, e)
            manager.record_failures({r: reason for r in group_req_ids}, content_hash)
    for content_hash in _failed_on_another_rank(list(by_adapter), loaded):
        extra, group_req_ids = by_adapter[content_hash][0], by_adapter[content_hash][4]
        reason = _reason(extra, RuntimeError("it could not be loaded on another tensor-parallel rank (see that "
                                             "worker's log)"))
        manager.record_failures({r: reason for r in group_req_ids}, content_hash)
        del loaded[content_hash]
    if _pipeline_stages() > 1:
        manager.stage_check = [(h, h in loaded, entry[0], entry[4]) for h, entry in by_adapter.items()]
    groups = []
    for content_hash, (extra, soft, instr, lengths, group_req_ids) in by_adapter.items():
        weights = loaded.get(content_hash)
        if weights is None:
            continue
        cu = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        groups.append(AdapterGroup(
            weights=weights,
            soft_rows=torch.from_numpy(np.concatenate(soft)).to(device, non_blocking=True),
            instruction_rows=torch.from_numpy(np.concatenate(instr)).to(device, non_blocking=True),
            cu_seqlens=torch.from_numpy(cu).to(device, non_blocking=True),
            segment_ids=torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths)).to(device, non_blocking=True),
        ))
    manager.trim()
    return StepPlan(groups) if groups else None


def _failed_on_another_rank(keys: list[str], loaded: dict[str, object]) -> list[str]:
    """The adapters of this step that loaded here but not on some other rank of the
    tensor-parallel group.

    Every rank loads adapters itself and computes the soft rows of its own heads,
    but only rank 0's output reaches the scheduler: an adapter that failed on rank
    1 alone would let rank 0 answer with rank 1's heads computed without soft rows.
    The ranks agree on one OK flag per adapter (same order everywhere: every rank
    builds its plan from the same batch) with a MIN all-reduce over the group's CPU
    (gloo) channel, only on steps that start an IAPT prefill, so no device sync.
    Pipeline stages agree later, in :func:`agree_across_stages`."""
    from vllm.distributed.parallel_state import get_tp_group, model_parallel_is_initialized

    if not keys or not model_parallel_is_initialized() or get_tp_group().world_size == 1:
        return []
    ok = torch.tensor([k in loaded for k in keys], dtype=torch.int32)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN, group=get_tp_group().cpu_group)
    return [k for k, flag in zip(keys, ok.tolist()) if not flag and k in loaded]


def _pipeline_stages() -> int:
    from vllm.distributed.parallel_state import get_pp_group, model_parallel_is_initialized

    return get_pp_group().world_size if model_parallel_is_initialized() else 1


def agree_across_stages(manager: IAPTAdapterManager) -> None:
    """After the step's forward (from ``sample_tokens``): the pipeline stages agree
    on which of the step's adapters loaded, and the requests of an adapter that
    failed on any stage fail here too, so the last stage (whose output reaches the
    scheduler) reports them and nothing is answered with a stage's layers computed
    without their soft rows.

    Not in :func:`build_plan`: a later stage receives the previous stage's
    activations before it prepares its inputs, so an all-reduce there would wait for
    a stage that waits for it. Here every stage has sent its activations."""
    pending, manager.stage_check = manager.stage_check, None
    if not pending:
        return
    from vllm.distributed.parallel_state import get_pp_group

    ok = torch.tensor([here for _, here, _, _ in pending], dtype=torch.int32)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN, group=get_pp_group().cpu_group)
    for (content_hash, here, extra, req_ids), flag in zip(pending, ok.tolist()):
        if here and not flag:
            reason = _reason(extra, RuntimeError("it could not be loaded on another pipeline stage (see that "
                                                 "worker's log)"))
            manager.record_failures({r: reason for r in req_ids}, content_hash)


def _reason(extra: IAPTEntry, error: Exception) -> str:
    source = extra.source or extra.path
    text = str(error)
    if not text.startswith("IAPT adapter"):
        text = f"IAPT adapter {extra.name!r}: {type(error).__name__}: {text}"
    return f"{text} (adapter from {source!r}); the request was not run"


def _fail_cache_hits_of_failed_adapters(manager, req_ids, lora_ids, num_computed, num_prompt_tokens,
                                        sampling_params_of) -> None:
    """Requests that finish a prefill on cached blocks of an adapter whose load just
    failed could have hit blocks whose soft rows were never written: fail them too."""
    for i in np.flatnonzero((lora_ids > 0) & (num_computed > 0) & (num_computed < num_prompt_tokens)).tolist():
        extra = iapt_entry(sampling_params_of(req_ids[i]))
        if extra is not None and extra.content_hash in manager.failed_hashes:
            manager.record_failures({req_ids[i]: manager.failed_hashes[extra.content_hash]})
