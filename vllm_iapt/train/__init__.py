"""Adapter training (``vllm-iapt train``)."""

from vllm_iapt.train.trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
