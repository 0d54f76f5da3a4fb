"""Pydantic models for everything users write: adapter_config.json and engine options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_iapt.generator import Activation

TorchDtypeName = Literal["float32", "bfloat16", "float16"]

DEFAULT_NUMERATOR_DEGREE = 5
DEFAULT_DENOMINATOR_DEGREE = 4


class AdapterConfig(BaseModel):
    """``adapter_config.json`` exactly as in docs/iapt.md, section 6.

    Strict: unknown keys and values of the wrong JSON type are errors, so a file
    written for another format or method never half-loads.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    peft_type: Literal["IAPT"]
    format_version: Literal[1]
    base_model_name_or_path: str | None = None
    hidden_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    num_soft_tokens: int = Field(default=4, ge=1)
    bottleneck_dim: int = Field(ge=1)
    layers: list[int] | None = None
    activation: Activation
    rational_numerator_degree: int | None = Field(default=None, ge=0)
    rational_denominator_degree: int | None = Field(default=None, ge=1)
    torch_dtype: TorchDtypeName

    @model_validator(mode="after")
    def _check(self) -> "AdapterConfig":
        if self.layers is not None:
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers has duplicates: {list(self.layers)}")
            bad = [i for i in self.layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"layers {bad} are outside 0..{self.num_hidden_layers - 1}")
            if 0 not in self.layers:
                raise ValueError("layers must contain 0 (the soft slots' placeholder ids must never reach layer 0)")
        if self.activation != "rational" and (
            self.rational_numerator_degree is not None or self.rational_denominator_degree is not None
        ):
            raise ValueError(f"rational_*_degree keys are only allowed with activation 'rational', not {self.activation!r}")
        return self

    @property
    def generator_layers(self) -> tuple[int, ...]:
        """Layers with a generator, ascending (default: all)."""
        return tuple(sorted(self.layers)) if self.layers is not None else tuple(range(self.num_hidden_layers))

    @property
    def numerator_degree(self) -> int:
        return DEFAULT_NUMERATOR_DEGREE if self.rational_numerator_degree is None else self.rational_numerator_degree

    @property
    def denominator_degree(self) -> int:
        return DEFAULT_DENOMINATOR_DEGREE if self.rational_denominator_degree is None else self.rational_denominator_degree

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor ``adapter_model.safetensors`` must hold, with its shape."""
        d, r, m = self.hidden_size, self.bottleneck_dim, self.num_soft_tokens
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self.generator_layers:
            p = f"layers.{layer}."
            shapes[p + "down.weight"] = (r, d)
            shapes[p + "down.bias"] = (r,)
            shapes[p + "pool.query"] = (m, r)
            shapes[p + "up.weight"] = (d, r)
            shapes[p + "up.bias"] = (d,)
            if self.activation == "rational":
                shapes[p + "act.numerator"] = (self.numerator_degree + 1,)
                shapes[p + "act.denominator"] = (self.denominator_degree,)
        return shapes

    def num_parameters(self) -> int:
        return sum(_prod(s) for s in self.tensor_shapes().values())

    def to_json_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


class IAPTEngineConfig(BaseModel):
    """Engine options: ``additional_config={"iapt": {...}}`` offline, or the
    ``--iapt-*`` flags of ``vllm serve``. IAPT is enabled when the ``iapt`` key
    is present (``{}`` takes every default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_adapters: int = Field(
        8, ge=1,
        description="adapters whose generator weights stay resident on the device (LRU). A prefill step "
        "that needs more distinct adapters loads the extra ones for that step only. Decoding needs no "
        "adapter weights, so this never limits how many adapters decode together.")
    max_cpu_adapters: int | None = Field(
        None, ge=1,
        description="validated adapters kept in CPU memory (LRU), so a device miss does not read the disk; "
        "default: as many as max_cpu_adapter_bytes holds")
    max_cpu_adapter_bytes: int = Field(
        4 << 30, ge=1,
        description="bytes of adapter weights kept in CPU memory by each worker (LRU; float32, this rank's "
        "layers); an adapter larger than this is used for its step and not kept")
    max_device_adapter_bytes: int | None = Field(
        None, ge=1,
        description="device memory per worker for IAPT adapters, taken from the KV cache at start-up: the float32 "
        "generator weights of the resident adapters and of the adapters one prefill step needs, and the generators' "
        "working memory for max_num_batched_tokens rows (docs/engine.md, 'Memory'). Default: what a step with "
        "2 x max_adapters adapters of bottleneck 64 (up to 16 soft tokens, a generator in every layer) needs. Resident "
        "adapters a step does not use are evicted to make room; a step whose adapters still do not fit runs over "
        "the reservation (logged); an adapter that does not fit alone is refused")
    max_runtime_adapters: int = Field(
        4096, ge=0,
        description="adapters registered at run time (/v1/load_lora_adapter or the resolver) per API "
        "server, start-up adapters not counted. Past it, the least recently used resolver-loaded adapter is "
        "unregistered (the resolver loads it again on its next request); if there is none, the load is "
        "refused with HTTP 400")
    snapshot_dir: str | None = Field(
        None,
        description="directory of the content-addressed adapter snapshots that workers load from "
        "(default: <tmp>/vllm-iapt-snapshots-<uid>); must be private to the server's user")
    max_snapshot_bytes: int = Field(
        2 << 30, ge=1,
        description="bytes the snapshot directory may hold; the least recently used snapshots no request "
        "needs are deleted to make room (another server's only after 2 idle minutes), and an adapter that "
        "still does not fit is refused")
    read_ahead: bool | None = Field(
        None,
        description="hold the first request of an adapter new to the engine for one step, while every worker "
        "reads, checks and packs the adapter in a background thread, so that no step waits for the read. "
        "Default: on with a GPU or another accelerator (the host CPU is free while a step runs); off on a CPU "
        "device, where the read shares the cores with the step and the held request only waits a step longer")
    placeholder_token_id: int = Field(
        0, ge=0, description="token id written into the soft slots; any id works (layer 0 replaces it)")
    allow_unchecked_vllm: bool = Field(
        False, description="start on a vLLM version this plugin was not checked on (at your own risk)")

    @model_validator(mode="after")
    def _check(self) -> "IAPTEngineConfig":
        if self.max_cpu_adapters is not None and self.max_cpu_adapters < self.max_adapters:
            raise ValueError(f"max_cpu_adapters ({self.max_cpu_adapters}) must be >= max_adapters ({self.max_adapters})")
        return self

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "IAPTEngineConfig | None":
        """The options if IAPT is enabled, else None. Raises a ValueError that
        names the bad option."""
        if not additional_config or "iapt" not in additional_config:
            return None
        raw = additional_config["iapt"]
        if raw is None or raw is True:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"additional_config['iapt'] must be a dict of IAPT options, got {raw!r}")
        try:
            return cls.model_validate(raw)
        except Exception as e:  # pydantic's message names each bad field
            raise ValueError(f"invalid IAPT options additional_config['iapt']={raw!r}: {e}") from None
