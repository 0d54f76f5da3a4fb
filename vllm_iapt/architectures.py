"""The model families IAPT was checked on, and where their decoder layers live.

One table for both sides: the vLLM engine adds the soft-row write in front of the
layers it finds here (:mod:`vllm_iapt.engine.layers`), and the transformers
reference model hooks the same layers (:mod:`vllm_iapt.reference.model`). An
architecture is listed only after its parity test against the reference passed
(``tests/test_families.py``); anything else is refused when IAPT is enabled.

Adding a family: add its architecture name here, build a tiny checkpoint for it in
:func:`vllm_iapt.toy.build_checkpoint`, and add it to the family parity test. The
layer convention the engine relies on is vLLM's: a decoder layer's forward takes
``(positions, hidden_states, residual, ...)`` with ``residual is None`` at the
first layer (the stream entering the layer is ``hidden_states + residual``), or
``(positions, hidden_states, ...)`` where ``hidden_states`` is the stream itself.
"""

from __future__ import annotations

from torch import nn

#: Architecture name (``config.architectures[0]``) -> path of the decoder-layer
#: ``ModuleList``, the same in vLLM's model and in transformers' model.
CHECKED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "model.layers",
    "MistralForCausalLM": "model.layers",
    "Qwen2ForCausalLM": "model.layers",
    "Qwen3ForCausalLM": "model.layers",
    "Gemma3ForCausalLM": "model.layers",
    "GraniteForCausalLM": "model.layers",
}


class UnsupportedArchitectureError(ValueError):
    pass


def checked_architecture(architectures: list[str] | None) -> str:
    """The model's architecture if IAPT was checked on it, else a clear error."""
    names = list(architectures or [])
    for name in names:
        if name in CHECKED_ARCHITECTURES:
            return name
    raise UnsupportedArchitectureError(
        f"IAPT is not checked on architecture {', '.join(names) or '(unknown)'}; checked: "
        f"{', '.join(CHECKED_ARCHITECTURES)}. Adding a family is described in docs/engine.md "
        "('Model families').")


def decoder_layers(model: nn.Module, architecture: str) -> nn.ModuleList:
    """The decoder layers of a vLLM or transformers model of ``architecture``."""
    layers = model.get_submodule(CHECKED_ARCHITECTURES[architecture])
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{architecture}: {CHECKED_ARCHITECTURES[architecture]} is a "
                        f"{type(layers).__name__}, not the ModuleList of decoder layers")
    return layers
