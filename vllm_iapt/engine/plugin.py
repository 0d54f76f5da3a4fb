"""The ``vllm.general_plugins`` entry point, run once in every vLLM process
(front end, engine core, workers).

It applies the patches in ``patches/`` that this process needs, and arranges for
the rest to be applied when the process takes on the role that needs them
(:func:`vllm_iapt.patches.register`). They are inert unless an engine is started
with ``additional_config={"iapt": {...}}``: without it every patch calls straight
through and models keep vLLM's stock layers. With it, the worker adds the soft-row
op to the decoder layers of the model vLLM built (:mod:`vllm_iapt.engine.layers`),
whatever its family, if the family is one IAPT was checked on.
"""

from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from vllm_iapt import patches

    patches.register()
    _done = True
