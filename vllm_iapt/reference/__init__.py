"""The transformers reference implementation of IAPT (training and parity)."""

from vllm_iapt.reference.model import GenerationOutput, IAPTForCausalLM

__all__ = ["GenerationOutput", "IAPTForCausalLM"]
