"""The soft-row write in front of every decoder layer, for any checked family.

One mechanism serves eager mode, torch.compile and CUDA graphs:

* ``torch.ops.vllm.iapt_write_soft_rows(hidden_states, residual, layer_index)`` is
  a registered vLLM custom op, called unconditionally at the top of every decoder
  layer. Its body reads this step's plan from vLLM's forward context
  (:func:`vllm_iapt.engine.plan.current_plan`), so no Python branch on the plan is
  ever traced: a compiled graph stays valid across steps, and steps without a plan
  (every decode step) run the op as a no-op.
* The op is a graph-splitting op (added to ``compilation_config.splitting_ops``
  like attention's ``unified_attention_with_output``), so under vLLM's piecewise
  compilation it runs eagerly between compiled pieces with its data-dependent
  shapes. Under a whole-graph backend (vLLM's CPU mode) it is an opaque extern call.
* :func:`install` adds the call to the already-built layers of a model by giving
  each layer instance a subclass of its own class whose ``forward`` calls the op
  first. Parameter names, prefixes and weight loading are untouched, and a model
  built without IAPT keeps vLLM's stock layers.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from vllm_iapt.architectures import decoder_layers
from vllm_iapt.engine.plan import StepPlan, current_plan
from vllm_iapt.generator import GroupedLayout, generate_grouped, grouped_layout

OP_NAME = "iapt_write_soft_rows"
#: The op's qualified name, as ``compilation_config.splitting_ops`` lists ops.
SPLITTING_OP = f"vllm::{OP_NAME}"


def write_soft_rows(plan: StepPlan, layer: int, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> None:
    """Make the soft rows of the stream entering ``layer`` equal ``S``, in place.

    The stream entering a vLLM decoder layer is ``hidden_states + residual`` (the
    add is fused into the input RMSNorm; ``residual`` is None at the first layer
    and for families that carry the stream in ``hidden_states`` alone). Writing
    ``S`` into ``hidden_states`` and 0 into ``residual`` on the soft rows gives
    exactly ``S`` after the add, and touches no other row.

    All the groups (adapters) with a generator at ``layer`` run in one
    :func:`~vllm_iapt.generator.generate_grouped` call, so the number of operations
    per layer does not grow with the number of adapters in the step. A group whose
    adapter has no generator here keeps its slots as they are.
    """
    active = [i for i, group in enumerate(plan.groups) if group.weights[layer] is not None]
    if not active:
        return
    weights = [plan.groups[i].weights[layer] for i in active]
    layout, soft_rows = _step_layout(plan, active, weights)
    s = generate_grouped(weights, layout, hidden_states, residual)
    hidden_states.index_copy_(0, soft_rows, s.to(hidden_states.dtype))
    if residual is not None:
        residual.index_fill_(0, soft_rows, 0)


def _step_layout(plan: StepPlan, active: list[int], weights: list) -> tuple[GroupedLayout, torch.Tensor]:
    """The layout of the groups ``active`` of ``plan`` (built at the first layer that
    needs it, then reused by the step's other layers through ``plan.cache``) and
    their soft rows, concatenated in the same order."""
    key = ("grouped_layout", tuple((i, w.signature()) for i, w in zip(active, weights)))
    cached = plan.cache.get(key)
    if cached is None:
        groups = [plan.groups[i] for i in active]
        layout = grouped_layout(weights, [g.instruction_rows for g in groups], [g.segment_ids for g in groups],
                                [g.cu_seqlens.shape[0] - 1 for g in groups])
        cached = plan.cache[key] = (layout, torch.cat([g.soft_rows for g in groups]))
    return cached


def _op(hidden_states: torch.Tensor, residual: torch.Tensor | None, layer_index: int) -> None:
    plan = current_plan()
    if plan is not None:
        write_soft_rows(plan, layer_index, hidden_states, residual)


def _op_fake(hidden_states: torch.Tensor, residual: torch.Tensor | None, layer_index: int) -> None:
    return None


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    if not hasattr(torch.ops.vllm, OP_NAME):
        direct_register_custom_op(OP_NAME, _op, mutates_args=["hidden_states", "residual"], fake_impl=_op_fake)


_register_op()


class _WithResidual:
    """For layers called as ``layer(positions, hidden_states, residual, ...)``."""

    iapt_layer_index: int

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        torch.ops.vllm.iapt_write_soft_rows(hidden_states, residual, self.iapt_layer_index)
        return super().forward(positions, hidden_states, residual, *args, **kwargs)


class _StreamOnly:
    """For layers called as ``layer(positions, hidden_states, ...)``, whose
    ``hidden_states`` is the whole residual stream (e.g. Granite)."""

    iapt_layer_index: int

    def forward(self, positions, hidden_states, *args, **kwargs):
        torch.ops.vllm.iapt_write_soft_rows(hidden_states, None, self.iapt_layer_index)
        return super().forward(positions, hidden_states, *args, **kwargs)


@functools.cache
def iapt_layer_class(layer_cls: type[nn.Module]) -> type[nn.Module]:
    """``layer_cls`` with the soft-row write in front of its forward."""
    params = inspect.signature(layer_cls.forward).parameters
    names = list(params)[1:3]  # after self
    if names[:1] != ["positions"] or len(names) < 2 or names[1] != "hidden_states":
        raise TypeError(f"{layer_cls.__qualname__}.forward takes ({', '.join(names)}, ...), not "
                        "(positions, hidden_states, ...): not a vLLM decoder layer IAPT knows")
    mixin = _WithResidual if "residual" in params else _StreamOnly
    return type(f"IAPT{layer_cls.__name__}", (mixin, layer_cls), {"__module__": __name__})


def install(model: nn.Module, architecture: str) -> int:
    """Adds the soft-row write to every decoder layer this rank holds (pipeline
    parallel ranks hold placeholders for the others). Returns how many."""
    from vllm.model_executor.models.utils import PPMissingLayer

    count = 0
    for index, layer in enumerate(decoder_layers(model, architecture)):
        if isinstance(layer, PPMissingLayer):
            continue
        if not isinstance(layer, (_WithResidual, _StreamOnly)):
            layer.__class__ = iapt_layer_class(type(layer))
            layer.iapt_layer_index = index
        count += 1
    return count


def installed_layers(model: nn.Module, architecture: str) -> list[int]:
    """Indices of the layers that carry the soft-row write (for the start-up check)."""
    return [i for i, layer in enumerate(decoder_layers(model, architecture))
            if isinstance(layer, (_WithResidual, _StreamOnly))]
