"""IAPT-augmented LLaMA-family models for vLLM.

The layers are vLLM's own, with one addition in front: in a step whose plan
says some sequences start their prefill, each layer pools those sequences'
instruction rows of the residual stream entering it and writes the generated
soft rows ``S`` into their slots (spec section 3). The stock layer then
computes the slots' K/V, which vLLM's attention writes into each sequence's own
paged blocks. Every other row is left bit-identical to stock vLLM, and steps
without a plan (all decode steps) run the stock layer only.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine.plan import StepPlan, current_plan
from vllm_iapt.generator import generate_packed


def write_soft_rows(plan: StepPlan, layer: int, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> None:
    """Make the soft rows of the stream entering ``layer`` equal ``S``, in place.

    The decoder layer receives the stream as ``hidden_states + residual`` (vLLM
    fuses the add into the input RMSNorm; for layer 0 ``residual`` is None and
    the stream is ``hidden_states``). Writing ``S`` into ``hidden_states`` and 0
    into ``residual`` on the soft rows gives exactly ``S`` after the fused add,
    and touches no other row.
    """
    for group in plan.groups:
        weights = group.weights[layer]
        if weights is None:  # no generator here: the slots pass through
            continue
        x = hidden_states.index_select(0, group.instruction_rows)
        if residual is not None:
            x = x + residual.index_select(0, group.instruction_rows)
        s = generate_packed(weights, x, group.cu_seqlens, group.segment_ids)
        hidden_states.index_copy_(0, group.soft_rows, s.flatten(0, 1).to(hidden_states.dtype))
        if residual is not None:
            residual.index_fill_(0, group.soft_rows, 0)


class IAPTLayerMixin:
    """Adds the soft-row write in front of a LLaMA-style decoder layer."""

    def __init__(self, *args, prefix: str = "", **kwargs) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        self.iapt_layer_index = extract_layer_index(prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None, **kwargs):
        plan = current_plan()
        if plan is not None:
            write_soft_rows(plan, self.iapt_layer_index, hidden_states, residual)
        return super().forward(positions, hidden_states, residual, **kwargs)


class IAPTLlamaDecoderLayer(IAPTLayerMixin, LlamaDecoderLayer):
    pass


class IAPTMistralDecoderLayer(IAPTLayerMixin, MistralDecoderLayer):
    pass


def _enabled(vllm_config: VllmConfig) -> bool:
    return IAPTEngineConfig.from_additional_config(vllm_config.additional_config) is not None


class IAPTLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with IAPT layers when IAPT is enabled, stock otherwise."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type = LlamaDecoderLayer) -> None:
        if _enabled(vllm_config) and layer_type is LlamaDecoderLayer:
            layer_type = IAPTLlamaDecoderLayer
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class IAPTMistralForCausalLM(MistralForCausalLM):
    """``MistralForCausalLM`` with IAPT layers when IAPT is enabled, stock otherwise."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type = MistralDecoderLayer) -> None:
        if _enabled(vllm_config) and layer_type is MistralDecoderLayer:
            layer_type = IAPTMistralDecoderLayer
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
