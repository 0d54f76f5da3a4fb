"""Benchmark assets built locally: a LLaMA with random weights, random IAPT
adapters and random PEFT LoRA adapters of a given rank (no hub, no peft needed)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_iapt.config import AdapterConfig
from vllm_iapt.toy import build_llama, build_tokenizer, random_adapter

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    num_kv_heads: int | None = None  # None: as many as query heads
    real_model: str | None = None    # a real checkpoint (vllm_iapt.models) instead of random weights

    @property
    def num_heads(self) -> int:
        return self.hidden_size // 64

    @property
    def kv_dim(self) -> int:
        return 64 * (self.num_kv_heads or self.num_heads)

    def num_parameters(self) -> int:
        d, f, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        return self.num_layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * self.vocab_size * d + d

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each LoRA target module in one layer."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


SIZES = {
    # ~100M parameters: big enough that compute, not Python, dominates on a CPU.
    "default": ModelSize(hidden_size=768, num_layers=12, intermediate_size=2048, vocab_size=4096),
    # the test suite's smoke run
    "tiny": ModelSize(hidden_size=128, num_layers=2, intermediate_size=256, vocab_size=512),
    # the real pretrained model (vllm-iapt get-model smollm2); tied embeddings, so fewer than num_parameters()
    "smollm2": ModelSize(hidden_size=576, num_layers=30, intermediate_size=1536, vocab_size=49152, num_kv_heads=3,
                         real_model="smollm2"),
}


def build_model(out: Path, size: ModelSize, seed: int = 0) -> Path:
    if size.real_model:
        from vllm_iapt.models.smollm2 import get_model  # the one real model so far

        return get_model()
    if (out / "config.json").is_file():
        return out
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(4000)]
    tok = build_tokenizer(corpus, out, vocab_size=size.vocab_size)
    build_llama(out, vocab_size=len(tok), hidden_size=size.hidden_size, num_layers=size.num_layers,
                num_heads=size.num_heads, intermediate_size=size.intermediate_size, max_position_embeddings=4096,
                seed=seed, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out


def iapt_adapters(root: Path, size: ModelSize, n: int, bottleneck: int, m: int = 4) -> list[Path]:
    paths = []
    for i in range(n):
        p = root / f"iapt-{i}"
        if not (p / "adapter_model.safetensors").is_file():
            random_adapter(p, hidden_size=size.hidden_size, num_hidden_layers=size.num_layers,
                           num_soft_tokens=m, bottleneck_dim=bottleneck, seed=i)
        paths.append(p)
    return paths


def iapt_parameters(size: ModelSize, bottleneck: int, m: int = 4) -> int:
    cfg = AdapterConfig(peft_type="IAPT", format_version=1, hidden_size=size.hidden_size,
                        num_hidden_layers=size.num_layers, num_soft_tokens=m, bottleneck_dim=bottleneck,
                        activation="rational", torch_dtype="float32")
    return cfg.num_parameters()


def lora_parameters(size: ModelSize, rank: int) -> int:
    return size.num_layers * rank * sum(i + o for i, o in size.linear_shapes().values())


def parameter_matched_rank(size: ModelSize, bottleneck: int) -> int:
    """The vLLM-supported LoRA rank whose parameter count is closest to IAPT's."""
    target = iapt_parameters(size, bottleneck)
    return min(VLLM_LORA_RANKS, key=lambda r: abs(lora_parameters(size, r) - target))


def lora_adapters(root: Path, size: ModelSize, n: int, rank: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = root / f"lora-r{rank}-{i}"
        paths.append(p)
        if not (p / "adapter_model.safetensors").is_file():
            write_lora(p, size, rank, 1000 * rank + i, "bench-model")
    return paths


def write_lora(path: Path, size: ModelSize, rank: int, seed: int, base_model: str) -> None:
    """A random PEFT LoRA adapter on every linear layer of every layer; vLLM's filesystem
    resolver needs ``base_model`` to be the served model's path."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(size.num_layers):
        for name, (fan_in, fan_out) in size.linear_shapes().items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS), "bias": "none", "base_model_name_or_path": base_model}))


def versions() -> dict[str, str]:
    """Versions of the packages a benchmark result depends on (empty if not installed)."""
    import importlib.metadata as md

    out = {}
    for p in ("vllm", "torch", "transformers", "vllm-iapt"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = ""
    return out
