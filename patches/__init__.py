"""Every change vllm-iapt makes to vLLM's own behaviour, and nothing else.

One module per vLLM component. Each module's docstring says what it changes,
why, how, which vLLM versions it was checked on, and what would let it go away
upstream. :func:`apply_all` is called once per process by the plugin entry
point (``vllm_iapt.engine.plugin.register``); every patch is a no-op unless
IAPT is enabled in that engine's ``additional_config``.

A patch that cannot be imported or applied (a vLLM whose internals moved) never
breaks vLLM for users who do not enable IAPT: the failure is recorded in
:data:`FAILED` and logged as a warning. With IAPT enabled, start-up refuses
(:func:`check_patches`, called by :mod:`vllm_iapt.engine.support` and by every
other IAPT entry point) with a message naming the vLLM version and the failed
patch modules, because IAPT with some patches missing would run wrong.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger("vllm.iapt")

#: Applied in this order. ``engine_args`` goes first: it is what refuses IAPT at
#: start-up (unchecked version, failed patches, unsupported settings).
PATCH_MODULES: tuple[str, ...] = (
    "engine_args",
    "input_processor",
    "output_processor",
    "model_runner",
    "beam_search",
    "kv_cache_keys",
    "request_failures",
    "cli_args",
    "serving",
    "shutdown",
)

#: Patch module -> "ExceptionType: message", for every module that failed here.
FAILED: dict[str, str] = {}

_applied = False


class PatchError(RuntimeError):
    """IAPT was enabled, but some of vllm-iapt's patches could not be applied to
    this vLLM."""


def apply_all() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    for name in PATCH_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            module.apply()
        except Exception as e:  # noqa: BLE001 - anything here must not break plain vLLM
            FAILED[name] = f"{type(e).__name__}: {e}"
    if FAILED:
        logger.warning(
            "vllm-iapt could not patch vLLM %s (%s); vLLM works as usual, but starting an engine with IAPT "
            "enabled will be refused", _vllm_version(), "; ".join(f"{k}: {v}" for k, v in FAILED.items()))
        if "engine_args" in FAILED:
            _fallback_guard()


def check_patches() -> None:
    """Raises :class:`PatchError` if any patch failed in this process (call it
    only when IAPT is enabled)."""
    if FAILED:
        from vllm_iapt.engine.support import CHECKED_VLLM_VERSIONS

        raise PatchError(
            f"IAPT cannot run on vLLM {_vllm_version()}: vllm-iapt's patches "
            f"{', '.join(sorted(FAILED))} could not be applied ("
            + "; ".join(f"{k}: {v}" for k, v in sorted(FAILED.items()))
            + f"). vllm-iapt was checked on vLLM {', '.join(CHECKED_VLLM_VERSIONS)}; install that version "
            "(pip install -e . pins it) or see docs/engine.md, 'Supporting a new vLLM version'.")


def _vllm_version() -> str:
    try:
        from vllm_iapt.engine.support import vllm_version

        return vllm_version()
    except Exception:  # noqa: BLE001
        return "unknown"


def _fallback_guard() -> None:
    """``engine_args`` failed, so nothing refuses IAPT at config time: wrap the
    engine-config constructor as simply as possible so that an IAPT config is
    refused there (the input processor, the worker and the CLI check too)."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        original = EngineArgs.create_engine_config

        def create_engine_config(self, *args, **kwargs):
            if "iapt" in (getattr(self, "additional_config", None) or {}):
                check_patches()
            return original(self, *args, **kwargs)

        EngineArgs.create_engine_config = create_engine_config
    except Exception as e:  # noqa: BLE001
        logger.warning("vllm-iapt: the fallback start-up guard could not be installed either (%s)", e)
