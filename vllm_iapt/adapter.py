"""IAPT adapter directories (docs/iapt.md, section 6): validate, load, save.

Loading is all-or-nothing: a directory either yields a fully validated
:class:`IAPTAdapter` or raises :class:`AdapterError` naming the adapter, the file
or tensor, and the problem. Weights come from safetensors only, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
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


#: adapter_config.json is read up to this many bytes; a larger file is refused.
MAX_CONFIG_BYTES = 64 * 1024
#: Bytes of header JSON allowed in adapter_model.safetensors: a fixed allowance for
#: ``__metadata__`` plus this much per tensor.
HEADER_BASE_BYTES = 64 * 1024
HEADER_BYTES_PER_TENSOR = 512

_ITEM_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_adapter(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    root: str | os.PathLike | None = None,
) -> IAPTAdapter:
    """Load and fully validate an adapter directory.

    ``hidden_size``/``num_hidden_layers`` are the base model's; when given, an
    adapter built for another base model is refused. With ``root``, every file
    read must really be inside ``root`` (checked on the open file, so a symlink
    swapped in at any time cannot lead outside).
    """
    return read_adapter(path, name=name, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, root=root)[0]


def read_adapter(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    root: str | os.PathLike | None = None,
) -> tuple[IAPTAdapter, bytes]:
    """:func:`load_adapter`, also returning the exact bytes of the weights file
    that were validated (what a snapshot stores).

    Reads are bounded: ``adapter_config.json`` up to :data:`MAX_CONFIG_BYTES`; the
    weights file must be exactly as large as its config's tensor shapes and its
    safetensors header imply, which is checked before its data is read.
    """
    path = Path(path)
    name = name or path.name
    root = os.path.realpath(root) if root is not None else None
    if not path.is_dir():
        raise AdapterError(name, f"adapter directory {str(path)!r} does not exist or is not a directory")
    config = _read_config(name, path / CONFIG_NAME, root)
    _check_base_model(name, config, hidden_size, num_hidden_layers)
    raw = _read_weights(name, path / WEIGHTS_NAME, config, root)
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, OSError) as e:
        raise AdapterError(name, f"{WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    validate_tensors(name, config, tensors)
    return IAPTAdapter(name, str(path), config, tensors, content_hash(config, raw)), raw


def config_bytes(config: AdapterConfig) -> bytes:
    """The canonical form of a config: what the content hash covers and what a
    snapshot stores."""
    return json.dumps(config.to_json_dict(), sort_keys=True).encode()


def content_hash(config: AdapterConfig, weights: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(config_bytes(config))
    digest.update(weights)
    return digest.hexdigest()


def expected_data_bytes(config: AdapterConfig) -> int:
    """Bytes of tensor data the weights file must hold (after its header)."""
    return sum(_prod(shape) for shape in config.tensor_shapes().values()) * _ITEM_SIZES[config.torch_dtype]


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def _open_file(name: str, file: Path, root: str | None, missing: str | None = None) -> tuple[int, os.stat_result]:
    """Opens ``file`` for reading; it must be a regular file and, with ``root``,
    really inside ``root`` (the real path of the open descriptor is checked, so
    what is read is what was checked). Never blocks on a FIFO."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AdapterError(name, missing or f"missing {file.name} in {str(file.parent)!r}") from None
    except OSError as e:
        raise AdapterError(name, f"cannot open {file.name}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(name, f"{file.name} is not a regular file")
        if root is not None:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc: the path as the kernel resolves it now
                real = os.path.realpath(file)
            if not _inside(real, root):
                raise AdapterError(name, f"{file.name} resolves to a file outside the adapter directory")
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_weights(name: str, file: Path, config: AdapterConfig, root: str | None) -> bytes:
    fd, st = _open_file(name, file, root, missing=f"missing weights file {str(file)!r}")
    try:
        data_bytes = expected_data_bytes(config)
        max_header = HEADER_BASE_BYTES + HEADER_BYTES_PER_TENSOR * len(config.tensor_shapes())
        if st.st_size > 8 + max_header + data_bytes:
            raise AdapterError(name, f"{WEIGHTS_NAME} is {st.st_size} bytes, more than its config's tensors "
                               f"can take ({data_bytes} bytes of data plus a header of at most {max_header})")
        head = _read_exactly(fd, 8)
        if len(head) < 8:
            raise AdapterError(name, f"{WEIGHTS_NAME} is not a readable safetensors file: too short")
        header_len = int.from_bytes(head, "little")
        if header_len > max_header:
            raise AdapterError(name, f"{WEIGHTS_NAME} is not a readable safetensors file: header of "
                               f"{header_len} bytes (at most {max_header} for this config)")
        expected = 8 + header_len + data_bytes
        if st.st_size > expected:
            raise AdapterError(name, f"{WEIGHTS_NAME} is {st.st_size} bytes, more than its config's tensor "
                               f"shapes and its header imply ({expected})")
        # Smaller files are read (they are bounded) so that validation can say
        # which tensor is missing or has the wrong shape.
        rest = _read_exactly(fd, st.st_size - 8)
        if len(rest) != st.st_size - 8 or _read_exactly(fd, 1):
            raise AdapterError(name, f"{WEIGHTS_NAME} changed while it was read")
        return head + rest
    finally:
        os.close(fd)


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
    # One check over every value (a per-tensor check was most of the validation time of
    # a 30-layer adapter); the tensor to name is looked for only when it fails.
    if not bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors.values()])).all()):
        bad = next(k for k in expected if not bool(torch.isfinite(tensors[k]).all()))
        raise AdapterError(name, f"tensor {bad!r} has non-finite values (NaN or inf)")


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


def read_config_json(name: str, config_path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[str, object]:
    """The text and parsed JSON of an ``adapter_config.json``, read bounded
    (:data:`MAX_CONFIG_BYTES`) and, with ``root``, confined to it."""
    root = os.path.realpath(root) if root is not None else None
    fd, st = _open_file(name, Path(config_path), root)
    try:
        if st.st_size > MAX_CONFIG_BYTES:
            raise AdapterError(name, f"{CONFIG_NAME} is {st.st_size} bytes (at most {MAX_CONFIG_BYTES})")
        raw = _read_exactly(fd, MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(name, f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode()
        return text, json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(name, f"{CONFIG_NAME} is not readable JSON: {e}") from None


def _read_config(name: str, config_path: Path, root: str | None = None) -> AdapterConfig:
    text, data = read_config_json(name, config_path, root)
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
