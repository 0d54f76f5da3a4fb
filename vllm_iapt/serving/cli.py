"""The ``--iapt-*`` flags of ``vllm serve`` and how they reach the engine.

The engine options are generated from :class:`vllm_iapt.config.IAPTEngineConfig`
(names, types, help text and defaults), so the CLI and
``additional_config={"iapt": {...}}`` cannot drift apart. ``EngineArgs.from_cli_args``
keeps only its own dataclass fields, so :func:`fold_into_engine_args` moves the
flags into ``additional_config["iapt"]`` (the documented channel for out-of-tree
engine options) and ``--iapt-modules`` into the namespace's ``lora_modules``,
which the OpenAI server registers at start-up.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from vllm_iapt.cli import add_model_flags
from vllm_iapt.config import IAPTEngineConfig

#: Flag names that follow vLLM's ``--max-loras`` / ``--max-cpu-loras`` style;
#: every other engine option ``foo_bar`` is ``--iapt-foo-bar``.
_FLAG_NAMES = {"max_adapters": "--max-iapt-adapters", "max_cpu_adapters": "--max-cpu-iapt-adapters",
               "max_runtime_adapters": "--max-runtime-iapt-adapters",
               "max_cpu_adapter_bytes": "--max-cpu-iapt-adapter-bytes"}
_DEST_PREFIX = "iapt_opt_"


def option_flag(field: str) -> str:
    return _FLAG_NAMES.get(field, "--iapt-" + field.replace("_", "-"))


@dataclass
class ServingOptions:
    """API-server-only settings (not engine options: the engine never sees them)."""

    adapter_dir: str | None = None


#: Set by :func:`fold_into_engine_args`, which runs in every API-server process.
serving_options = ServingOptions()


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Adds the "IAPT" argument group."""
    from vllm.engine.arg_utils import optional_type
    from vllm.entrypoints.launchers.cli_args import LoRAParserAction

    group = parser.add_argument_group(
        title="IAPT", description="Serve IAPT (Instance-Aware Prompt Tuning) adapters. "
        "Adapters are selected with the request's `model` field, like LoRA adapters.")
    group.add_argument("--enable-iapt", action="store_true", default=False,
                       help="Enable IAPT adapters (the same as --additional-config '{\"iapt\": {}}'). "
                       "Cannot be combined with --enable-lora.")
    group.add_argument(
        "--iapt-modules", type=optional_type(str), default=None, nargs="+", action=LoRAParserAction,
        help="IAPT adapters to serve, loaded and validated at start-up: `name=path`, or JSON "
        "'{\"name\": \"sort\", \"path\": \"/adapters/sort\", \"base_model_name\": \"my-model\"}'. "
        "A bad adapter stops start-up.")
    group.add_argument(
        "--iapt-adapter-dir", type=str, default=None,
        help="Directory for run-time adapters (only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1): "
        "/v1/load_lora_adapter accepts paths inside it only, and a request for an unknown plain model "
        "name `x` loads `<dir>/x` if it holds an IAPT adapter. Without it, run-time loading is refused.")
    # argparse would show "(default: None)": unset means the engine default, or the
    # value given in --additional-config.
    add_model_flags(group, IAPTEngineConfig, flag_of=option_flag, dest_of=lambda name: _DEST_PREFIX + name,
                    help_of=lambda name, field: f"{field.description or name}. Same as "
                    f"additional_config['iapt']['{name}']; engine default {field.default}.")


def iapt_enabled(args: argparse.Namespace, additional_config: dict) -> bool:
    """``--enable-iapt``, or an ``iapt`` key in ``--additional-config``."""
    return bool(getattr(args, "enable_iapt", False)) or "iapt" in additional_config


def fold_into_engine_args(args: argparse.Namespace, engine_args: Any) -> None:
    """Moves the ``--iapt-*`` flags into ``engine_args.additional_config["iapt"]``
    and ``args.lora_modules``. Raises a ValueError for flags given without IAPT.
    Idempotent (every API-server process calls it on the same namespace)."""
    options = {name: getattr(args, _DEST_PREFIX + name, None) for name in IAPTEngineConfig.model_fields}
    options = {k: v for k, v in options.items() if v is not None}
    modules = getattr(args, "iapt_modules", None) or []
    adapter_dir = getattr(args, "iapt_adapter_dir", None)
    additional = dict(engine_args.additional_config or {})
    if not iapt_enabled(args, additional):
        given = [option_flag(k) for k in options] + (["--iapt-modules"] if modules else []) + (
            ["--iapt-adapter-dir"] if adapter_dir else [])
        if given:
            raise ValueError(f"{', '.join(given)} need --enable-iapt")
        return
    current = additional.get("iapt")
    if current is None or current is True:
        current = {}
    if not isinstance(current, dict):
        raise ValueError(f"additional_config['iapt'] must be a dict of IAPT options, got {current!r}")
    additional["iapt"] = {**current, **options}
    engine_args.additional_config = additional
    # Also on the namespace: with --api-server-count > 1, vLLM hands this namespace
    # to API-server processes that build their engine args before any plugin (so
    # before this fold) is loaded there; the dataclass field reaches them as is.
    args.additional_config = additional
    if adapter_dir is not None:
        if not os.path.isdir(adapter_dir):
            raise ValueError(f"--iapt-adapter-dir {adapter_dir!r} is not a directory")
        serving_options.adapter_dir = os.path.realpath(adapter_dir)
    if modules:
        existing = list(args.lora_modules or [])
        names = {m.name for m in existing}
        args.lora_modules = existing + [m for m in modules if m.name not in names]


def settle_api_server_count(args: argparse.Namespace) -> None:
    """One API server by default when adapters can be loaded at run time. vLLM
    refuses ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` with several API servers (a load
    would reach only the server that took it; IAPT's run-time registry lives there
    too), yet defaults to one API server per engine under ``--data-parallel-size N``,
    so data parallelism with run-time loading would not start. Unset, the count is 1
    (every data-parallel engine serves behind it); an explicit count is vLLM's to judge."""
    from vllm import envs

    enabled = iapt_enabled(args, getattr(args, "additional_config", None) or {})
    if (enabled and envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING and not getattr(args, "headless", False)
            and getattr(args, "api_server_count", None) is None):
        args.api_server_count = 1
