"""Worker-side IAPT state: one object per model runner, created when the model is loaded.

:meth:`IAPTWorkerState.attach` runs in every worker right after vLLM built the
model. It re-checks the configuration the worker was handed
(:func:`vllm_iapt.engine.support.check_and_adjust`), adds the soft-row write to
the decoder layers (:func:`vllm_iapt.engine.layers.install`) and proves that the
model runner in use publishes IAPT plans to them: its input preparation and model
forward must be the ones ``patches/model_runner.py`` wraps. A runner that does
not (model runner V2, an out-of-tree runner that overrides them) fails start-up
here, before any request could run without its soft tokens.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_iapt.architectures import checked_architecture
from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine import layers, support
from vllm_iapt.engine.adapter_manager import IAPTAdapterManager
from vllm_iapt.engine.plan import StepPlan

logger = logging.getLogger("vllm.iapt")

#: Attribute that marks the runner methods wrapped by ``patches/model_runner.py``.
PUBLISHER_MARK = "__iapt_publishes_plans__"
#: The runner methods that must carry the mark.
PUBLISHER_METHODS = ("_prepare_inputs", "_model_forward")


class IAPTWorkerState:
    """What one model runner needs for IAPT: the adapter manager and the plan of
    the step being prepared (built in ``_prepare_inputs``, published into the
    forward context in ``_model_forward``)."""

    def __init__(self, cfg: IAPTEngineConfig, manager: IAPTAdapterManager, architecture: str,
                 num_layers: int) -> None:
        self.config = cfg
        self.manager = manager
        self.architecture = architecture
        self.num_layers = num_layers  # layers with the soft-row write on this rank
        self.pending: StepPlan | None = None
        self.penalty_prompts_fixed: Any = None  # the prompt-token tensor last cleaned of slots

    @classmethod
    def attach(cls, runner: Any) -> "IAPTWorkerState | None":
        """Sets ``runner.iapt`` (None when IAPT is off); raises if IAPT cannot run."""
        vllm_config = runner.vllm_config
        cfg = support.config_of(vllm_config)
        if cfg is None:
            runner.iapt = None
            return None
        missing = [m for m in PUBLISHER_METHODS if not getattr(getattr(type(runner), m, None), PUBLISHER_MARK, False)]
        if missing:
            raise RuntimeError(
                f"IAPT: the model runner in use ({type(runner).__module__}.{type(runner).__qualname__}) does not "
                f"publish IAPT plans ({', '.join(missing)} not wrapped by vllm-iapt), so adapter requests would "
                "run without their soft tokens. vllm-iapt supports vLLM's model runner V1 "
                "(unset VLLM_USE_V2_MODEL_RUNNER).")
        support.check_and_adjust(vllm_config, cfg)
        model_config = vllm_config.model_config
        architecture = checked_architecture(getattr(model_config.hf_config, "architectures", None))
        model = runner.get_model()
        count = layers.install(model, architecture)
        if count == 0 or len(layers.installed_layers(model, architecture)) != count:
            raise RuntimeError(f"IAPT: found no decoder layers to add the soft-row write to in {type(model).__name__}")
        text = model_config.hf_text_config
        manager = IAPTAdapterManager(cfg, runner.device, text.hidden_size, text.num_hidden_layers)
        runner.iapt = state = cls(cfg, manager, architecture, count)
        logger.info("IAPT: soft-row op in %d decoder layers of %s (%s); model runner %s; compilation mode %s, "
                    "cudagraph mode %s", count, type(model).__name__, architecture, type(runner).__name__,
                    vllm_config.compilation_config.mode.name, vllm_config.compilation_config.cudagraph_mode.name)
        return state
