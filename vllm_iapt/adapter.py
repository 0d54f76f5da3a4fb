"""IAPT adapter directories (IAPT_SPEC section 6): validate, load, save.

Loading is all-or-nothing: a directory either yields a fully validated
:class:`IAPTAdapter` or raises :class:`AdapterError` naming the adapter, the file
or tensor, and the problem. Weights come from safetensors only, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from vllm_iapt.config import AdapterConfig
from vllm_iapt.generator import GeneratorWeights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SUPPORTED_FORMAT_VERSIONS = (1,)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class AdapterError(ValueError):
    """A bad IAPT adapter. The message names the adapter and what is wrong."""

    def __init__(self, adapter: str, problem: str) -> None:
        self.adapter = adapter
        self.problem = problem
        super().__init__(f"IAPT adapter {adapter!r}: {problem}")


@dataclass(frozen=True)
class IAPTAdapter:
    """A validated adapter held in memory (CPU tensors in the stored dtype)."""

    name: str
    path: str
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    content_hash: str  # sha256 of config + weights: the adapter's identity for caching

    @property
    def num_soft_tokens(self) -> int:
        return self.config.num_soft_tokens

    def layer_weights(self, layer: int) -> GeneratorWeights | None:
        """The generator of ``layer``, or None if that layer has none."""
        p = f"layers.{layer}."
        if p + "down.weight" not in self.tensors:
            return None
        t = self.tensors
        return GeneratorWeights(
            t[p + "down.weight"], t[p + "down.bias"], t[p + "pool.query"], t[p + "up.weight"],
            t[p + "up.bias"], self.config.activation, t.get(p + "act.numerator"), t.get(p + "act.denominator"),
        )

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def load_adapter(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
) -> IAPTAdapter:
    """Load and fully validate an adapter directory.

    ``hidden_size``/``num_hidden_layers`` are the base model's; when given, an
    adapter built for another base model is refused.
    """
    path = Path(path)
    name = name or path.name
    if not path.is_dir():
        raise AdapterError(name, f"adapter directory {str(path)!r} does not exist or is not a directory")
    config = _read_config(name, path / CONFIG_NAME)
    _check_base_model(name, config, hidden_size, num_hidden_layers)

    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterError(name, f"missing weights file {str(weights_path)!r}")
    raw = weights_path.read_bytes()
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, OSError) as e:
        raise AdapterError(name, f"{WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    validate_tensors(name, config, tensors)

    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_json_dict(), sort_keys=True).encode())
    digest.update(raw)
    return IAPTAdapter(name, str(path), config, tensors, digest.hexdigest())


def validate_tensors(name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    expected = config.tensor_shapes()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(name, f"{WEIGHTS_NAME} is missing tensors {missing}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterError(name, f"{WEIGHTS_NAME} has unexpected tensors {extra}")
    dtype = DTYPES[config.torch_dtype]
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise AdapterError(name, f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != dtype:
            raise AdapterError(
                name, f"tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                f"but torch_dtype is {config.torch_dtype!r}")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(name, f"tensor {key!r} has non-finite values (NaN or inf)")


def save_adapter(
    path: str | os.PathLike, config: AdapterConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """Write an adapter directory; the tensors are cast to ``config.torch_dtype``
    and validated with the same rules as loading, so nothing invalid is written."""
    path = Path(path)
    dtype = DTYPES[config.torch_dtype]
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    validate_tensors(path.name, config, out)
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / WEIGHTS_NAME), metadata={"format": "pt", "peft_type": "IAPT"})
    (path / CONFIG_NAME).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")


def _read_config(name: str, config_path: Path) -> AdapterConfig:
    if not config_path.is_file():
        raise AdapterError(name, f"missing {CONFIG_NAME} in {str(config_path.parent)!r}")
    try:
        text = config_path.read_text()
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(name, f"{CONFIG_NAME} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterError(name, f"{CONFIG_NAME} must hold a JSON object, not {type(data).__name__}")
    # Clearer messages for the two keys that say "this is not our format".
    if data.get("peft_type") != "IAPT":
        raise AdapterError(name, f"{CONFIG_NAME}: peft_type is {data.get('peft_type')!r}, expected 'IAPT'")
    if data.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise AdapterError(
            name, f"{CONFIG_NAME}: unsupported format_version {data.get('format_version')!r} "
            f"(this vllm-iapt reads {list(SUPPORTED_FORMAT_VERSIONS)})")
    try:
        return AdapterConfig.model_validate_json(text)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())
        raise AdapterError(name, f"{CONFIG_NAME} is invalid: {problems}") from None


def _check_base_model(
    name: str, config: AdapterConfig, hidden_size: int | None, num_hidden_layers: int | None
) -> None:
    if hidden_size is not None and config.hidden_size != hidden_size:
        raise AdapterError(
            name, f"built for hidden_size {config.hidden_size}, but the base model has {hidden_size} "
            "(adapter for another base model?)")
    if num_hidden_layers is not None and config.num_hidden_layers != num_hidden_layers:
        raise AdapterError(
            name, f"built for num_hidden_layers {config.num_hidden_layers}, but the base model has "
            f"{num_hidden_layers} (adapter for another base model?)")
