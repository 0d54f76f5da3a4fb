"""Worker-side IAPT state: one object per model runner, created when the model is loaded.

Its home is the model runner (``runner.iapt``, None when IAPT is off); the patches
on the runner (``patches/model_runner.py``) only call its methods.

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

import numpy as np
import torch

from vllm_iapt.architectures import checked_architecture
from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine import failures, layers, support
from vllm_iapt.engine.adapter_manager import IAPTAdapterManager
from vllm_iapt.engine.admission import ANNOUNCE_ATTR
from vllm_iapt.engine.plan import StepPlan, agree_across_stages, build_plan, publish
from vllm_iapt.engine.request_entry import soft_token_count

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
        held = layers.installed_layers(model, architecture)
        if count == 0 or len(held) != count:
            raise RuntimeError(f"IAPT: found no decoder layers to add the soft-row write to in {type(model).__name__}")
        text = model_config.hf_text_config
        manager = IAPTAdapterManager(cfg, runner.device, text.hidden_size, text.num_hidden_layers, set(held))
        runner.iapt = state = cls(cfg, manager, architecture, count)
        logger.info("IAPT: soft-row op in %d decoder layers of %s (%s); model runner %s; compilation mode %s, "
                    "cudagraph mode %s", count, type(model).__name__, architecture, type(runner).__name__,
                    vllm_config.compilation_config.mode.name, vllm_config.compilation_config.cudagraph_mode.name)
        return state

    # -- one step: execute_model -> _prepare_inputs -> dispatch -> _model_forward -> sample_tokens -> end

    def read_ahead(self, scheduler_output: Any) -> None:
        """At the start of every step, also an empty one: starts reading the adapters
        the scheduler announced on it (:mod:`vllm_iapt.engine.admission`)."""
        self.manager.read_ahead(getattr(scheduler_output, ANNOUNCE_ATTR, ()))

    def prepare_step(self, runner: Any, num_scheduled_tokens: Any) -> None:
        """After vLLM prepared the step's inputs: builds the step's plan from the
        runner's InputBatch and hides the slots from the penalties."""
        batch = runner.input_batch
        n = batch.num_reqs
        self.pending = build_plan(
            self.manager, batch.req_ids, batch.request_lora_mapping[:n], batch.num_computed_tokens_cpu[:n],
            batch.num_prompt_tokens[:n], num_scheduled_tokens[:n],
            lambda req_id: runner.requests[req_id].sampling_params, runner.device)
        self._hide_slots_from_penalties(runner)

    def publish_plan(self, cudagraph_runtime_mode: Any) -> None:
        """Right before the model runs, inside its forward context: hands the
        step's plan to the layers (:func:`vllm_iapt.engine.plan.publish`)."""
        from vllm.config import CUDAGraphMode

        plan, self.pending = self.pending, None
        if plan is not None and cudagraph_runtime_mode == CUDAGraphMode.FULL:
            raise RuntimeError("IAPT: a step that starts an IAPT prefill was dispatched to a full CUDA graph, "
                               "which would skip the soft-row op (cudagraph_mode must not be FULL)")
        publish(plan)

    def report_failures(self, result: Any) -> Any:
        """After sampling: the requests whose adapter failed this step ride on the
        step's output to the scheduler (:mod:`vllm_iapt.engine.failures`)."""
        agree_across_stages(self.manager)
        if not self.manager.has_failures():
            return result
        taken = self.manager.take_failures()
        result, attached = failures.attach_to_output(result, taken)
        if not attached:  # nothing to carry them this step: keep them for the next
            self.manager.record_failures(taken)
        return result

    def end_step(self) -> None:
        """After ``execute_model``: a plan never published (a dummy or profiling
        run) is dropped, so no later forward sees a stale one."""
        self.pending = None

    def _hide_slots_from_penalties(self, runner: Any) -> None:
        """Pads the soft slots out of the prompt ids the penalties see (vLLM pads
        prompt rows with ``vocab_size``, which counts as no token): the repetition
        penalty treats every prompt token id as seen, and the placeholder id is a
        real token of the vocabulary."""
        batch = runner.input_batch
        prompts = batch.sampling_metadata.prompt_token_ids
        if prompts is None or prompts is self.penalty_prompts_fixed:
            return
        rows, cols = [], []
        for i in np.flatnonzero(batch.request_lora_mapping[: batch.num_reqs] > 0).tolist():
            m = soft_token_count(runner.requests[batch.req_ids[i]].sampling_params)
            rows += [i] * m
            cols += range(m)
        if rows:
            index = (torch.tensor(rows), torch.tensor(cols))
            prompts[tuple(t.to(prompts.device) for t in index)] = batch.vocab_size
        self.penalty_prompts_fixed = prompts
