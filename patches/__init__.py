"""Every change vllm-iapt makes to vLLM's own behaviour, and nothing else.

One module per vLLM component. Each module's docstring says what it changes,
why, how, which vLLM versions it was checked on, and what would let it go away
upstream. :func:`apply_all` is called once per process by the plugin entry
point (``vllm_iapt.engine.plugin.register``); every patch is a no-op unless
IAPT is enabled in that engine's ``additional_config``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.iapt")

from vllm_iapt.engine.support import CHECKED_VLLM_VERSIONS, vllm_version  # noqa: E402

_applied = False


def apply_all() -> None:
    global _applied
    if _applied:
        return
    from vllm_iapt.patches import (beam_search, cli_args, engine_args, input_processor, model_runner,
                                   output_processor, serving)

    # engine_args goes first and always: it is what refuses to start IAPT on an
    # unchecked vLLM version, so it must be there even if the others could fail.
    engine_args.apply()
    try:
        input_processor.apply()
        output_processor.apply()
        model_runner.apply()
        beam_search.apply()
        cli_args.apply()
        serving.apply()
    except Exception as e:  # an unchecked vLLM whose internals moved
        if vllm_version() in CHECKED_VLLM_VERSIONS:
            raise
        logger.warning("vllm-iapt: could not patch vLLM %s (%s); IAPT will refuse to start", vllm_version(), e)
    _applied = True
