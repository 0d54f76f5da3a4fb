"""Adapters on disk: valid ones (:func:`write_adapter`) and the catalogue of
malformed loads that must each be refused with a 4xx (:func:`build_catalogue`)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from . import BASE


def write_adapter(path: Path, seed: int, num_soft_tokens: int = 4, **kw) -> Path:
    from vllm_iapt.toy import random_adapter

    kw.setdefault("hidden_size", 128)
    kw.setdefault("num_hidden_layers", 4)
    kw.setdefault("bottleneck_dim", 16)
    random_adapter(path, num_soft_tokens=num_soft_tokens, seed=seed, scale=2.0, **kw)
    return path


def _config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))


def build_catalogue(adir: Path, outside: Path, good: Path) -> list[dict]:
    """Malformed loads, one dict per kind: ``kind``, ``route``, ``body`` (JSON) or
    ``raw`` (bytes), and what is wrong. Every one must be refused with a 4xx."""
    import torch

    bad = adir / "bad"
    if bad.exists():
        shutil.rmtree(bad)
    bad.mkdir(parents=True)
    cfg, tensors = _config(good), _tensors(good)
    out: list[dict] = []

    def add(kind: str, what: str, path: str | None = None, *, name: str | None = None, body: dict | None = None,
            raw: bytes | None = None, route: str = "/v1/load_lora_adapter") -> None:
        if body is None and raw is None:
            body = {"lora_name": name if name is not None else f"bad-{kind}", "lora_path": path}
        out.append({"kind": kind, "what": what, "route": route, "body": body, "raw": raw})

    def variant(kind: str, config: dict | str | None = "same", weights: dict | bytes | None = "same") -> str:
        d = bad / kind
        d.mkdir()
        if config is not None:
            text = json.dumps(cfg) if config == "same" else config if isinstance(config, str) else json.dumps(config)
            (d / "adapter_config.json").write_text(text)
        if weights is not None:
            if isinstance(weights, bytes):
                (d / "adapter_model.safetensors").write_bytes(weights)
            elif weights == "same":
                shutil.copy(good / "adapter_model.safetensors", d / "adapter_model.safetensors")
            else:
                _save_tensors(d, weights)
        return f"bad/{kind}"

    raw_weights = (good / "adapter_model.safetensors").read_bytes()
    add("missing_dir", "directory does not exist", "bad/does-not-exist")
    add("missing_config", "no adapter_config.json", variant("missing_config", config=None))
    add("missing_weights", "no adapter_model.safetensors", variant("missing_weights", weights=None))
    add("config_bad_json", "adapter_config.json is not JSON", variant("config_bad_json", config="{not json"))
    add("config_not_object", "adapter_config.json is a JSON list", variant("config_not_object", config="[1, 2]"))
    add("config_empty", "adapter_config.json is empty", variant("config_empty", config=""))
    add("config_binary", "adapter_config.json is not UTF-8", variant("config_binary", config=None))
    (bad / "config_binary" / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    add("peft_type_lora", "peft_type LORA", variant("peft_type_lora", config={**cfg, "peft_type": "LORA"}))
    add("format_version_2", "unsupported format_version", variant("format_version_2", config={**cfg, "format_version": 2}))
    add("config_unknown_key", "unknown key in the config", variant("config_unknown_key", config={**cfg, "lora_alpha": 8}))
    add("config_wrong_type", "hidden_size is a string", variant("config_wrong_type", config={**cfg, "hidden_size": "128"}))
    add("config_bad_dtype", "torch_dtype int8", variant("config_bad_dtype", config={**cfg, "torch_dtype": "int8"}))
    add("config_huge", "a 4 MB config (unknown key)",
        variant("config_huge", config=json.dumps({**cfg, "padding": "x" * (4 << 20)})))
    add("wrong_hidden_size", "built for hidden_size 64", str(write_adapter(bad / "wrong_hidden_size", 7, hidden_size=64).relative_to(adir)))
    add("wrong_layer_count", "built for 3 layers (model has 4)",
        str(write_adapter(bad / "wrong_layer_count", 8, num_hidden_layers=3).relative_to(adir)))
    add("layers_out_of_range", "layers [0, 7] with 4 layers", variant("layers_out_of_range", config={**cfg, "layers": [0, 7]}))
    add("layers_without_0", "layers [1, 2] (must contain 0)", variant("layers_without_0", config={**cfg, "layers": [1, 2]}))
    add("soft_tokens_over_block", "64 soft tokens > KV block size 32",
        str(write_adapter(bad / "soft_tokens_over_block", 9, num_soft_tokens=64).relative_to(adir)))
    add("weights_truncated", "safetensors cut in half", variant("weights_truncated", weights=raw_weights[: len(raw_weights) // 2]))
    add("weights_garbage", "random bytes", variant("weights_garbage", weights=random.Random(1).randbytes(4096)))
    add("weights_empty", "empty weights file", variant("weights_empty", weights=b""))
    add("weights_header_huge", "header length 2**40", variant("weights_header_huge", weights=(1 << 40).to_bytes(8, "little") + b"{}"))
    add("weights_oversized", "valid file + 64 MiB of trailing bytes",
        variant("weights_oversized", weights=raw_weights + bytes(64 << 20)))
    add("weights_pickle", "a torch pickle named .safetensors", variant("weights_pickle", weights=None))
    torch.save(tensors, bad / "weights_pickle" / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    add("tensor_missing", f"no {key}", variant("tensor_missing", weights={k: v for k, v in tensors.items() if k != key}))
    add("tensor_extra", "an extra tensor", variant("tensor_extra", weights={**tensors, "layers.9.extra": torch.zeros(3)}))
    wkey = next(k for k in sorted(tensors) if k.endswith("down.weight"))
    add("tensor_wrong_shape", f"{wkey} transposed",
        variant("tensor_wrong_shape", weights={**tensors, wkey: tensors[wkey].t().contiguous()}))
    add("tensor_wrong_dtype", "float16 tensors, config float32",
        variant("tensor_wrong_dtype", weights={k: v.half() for k, v in tensors.items()}))
    nan = tensors[wkey].clone()
    nan[0, 0] = float("nan")
    add("tensor_nan", "a NaN weight", variant("tensor_nan", weights={**tensors, wkey: nan}))
    inf = tensors[wkey].clone()
    inf[0, 0] = float("inf")
    add("tensor_inf", "an inf weight", variant("tensor_inf", weights={**tensors, wkey: inf}))
    (bad / "config_is_dir").mkdir()
    (bad / "config_is_dir" / "adapter_config.json").mkdir()
    shutil.copy(good / "adapter_model.safetensors", bad / "config_is_dir" / "adapter_model.safetensors")
    add("config_is_dir", "adapter_config.json is a directory", "bad/config_is_dir")
    d = Path(variant("weights_fifo", weights=None))
    os.mkfifo(adir / d / "adapter_model.safetensors")
    add("weights_fifo", "weights file is a FIFO (reading it would block)", str(d))
    (bad / "path_is_file").write_text("not a directory")
    add("path_is_file", "the path is a file", "bad/path_is_file")
    os.symlink(outside, bad / "symlink_dir_outside")
    add("symlink_dir_outside", "directory symlink to outside the adapter dir", "bad/symlink_dir_outside")
    d = Path(variant("symlink_weights_outside", weights=None))
    os.symlink(outside / "adapter_model.safetensors", adir / d / "adapter_model.safetensors")
    add("symlink_weights_outside", "weights symlinked outside the adapter dir", str(d))
    add("path_traversal", "../ out of the adapter dir", f"../{outside.name}")
    add("absolute_outside", "absolute path outside the adapter dir", str(outside))
    add("name_not_plain", "name with a slash", "bad/missing_config", name="a/b")
    add("name_empty", "empty name", "bad/missing_config", name="")
    add("name_too_long", "name of 200 characters", "bad/missing_config", name="n" * 200)
    add("name_base_model", "the base model's name", str(good.relative_to(adir)), name=BASE)
    add("name_taken", "a static tenant's name, no load_inplace", str(good.relative_to(adir)), name="sort")
    add("body_not_json", "request body is not JSON", raw=b"this is not json")
    add("body_missing_path", "no lora_path", body={"lora_name": "bad-nopath"})
    add("body_wrong_types", "lora_name is a number", body={"lora_name": 5, "lora_path": ["x"]})
    add("unload_unknown", "unload a name that is not loaded", route="/v1/unload_lora_adapter",
        body={"lora_name": "never-loaded"})
    return out
