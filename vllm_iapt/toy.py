"""Small checkpoints (LLaMA and the other checked families), tokenizers and random
adapters built locally.

Used by the tests, the bundled demo and the benchmarks: nothing here touches a
model hub. head_dim defaults to 64 because vLLM's CPU attention supports 32, 64,
80, ... but not 16.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vllm_iapt.adapter import save_adapter
from vllm_iapt.config import AdapterConfig
from vllm_iapt.generator import Activation, RATIONAL_GELU_DENOMINATOR, RATIONAL_GELU_NUMERATOR

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

#: A minimal chat template so the chat API works on toy models.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` that adds BOS like LLaMA's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_llama(
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.02,
    seed: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
) -> LlamaForCausalLM:
    """A LLaMA with random (seeded) weights saved in transformers format."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size, head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return model


#: Family -> (transformers model_type, architecture, extra config keys). Random weights,
#: head_dim 64 (vLLM's CPU attention supports 32, 64, 80, ... but not 16), GQA.
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("llama", "LlamaForCausalLM", {}),
    "mistral": ("mistral", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", {"use_sliding_window": False}),
    # Layers 0 and 1 use a 32-token sliding window, layer 2 full attention.
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", {"sliding_window": 32, "layer_types": ["sliding_attention", "sliding_attention",
                                                                     "full_attention"],
                               "query_pre_attn_scalar": 64, "hidden_activation": "gelu_pytorch_tanh"}),
    "granite": ("granite", "GraniteForCausalLM", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.125,
                            "logits_scaling": 2.0}),
}


def build_checkpoint(
    family: str,
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    initializer_range: float = 0.1,
    seed: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
) -> torch.nn.Module:
    """A model of ``family`` (a key of :data:`FAMILIES`) with random (seeded)
    weights, saved in transformers format with its own config class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, architecture, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=2 * hidden_size,
        head_dim=hidden_size // num_heads, max_position_embeddings=2048, initializer_range=initializer_range,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        tie_word_embeddings=False, **extra)
    config.architectures = [architecture]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert type(model).__name__ == architecture, (type(model).__name__, architecture)
    model.save_pretrained(str(out_dir))
    return model


def random_adapter(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_soft_tokens: int = 4,
    bottleneck_dim: int = 16,
    activation: Activation = "rational",
    layers: list[int] | None = None,
    torch_dtype: str = "float32",
    scale: float = 1.0,
    seed: int = 0,
) -> AdapterConfig:
    """An adapter with random weights large enough to change the model's outputs."""
    cfg = AdapterConfig(
        peft_type="IAPT", format_version=1, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_soft_tokens=num_soft_tokens, bottleneck_dim=bottleneck_dim, layers=layers,
        activation=activation, torch_dtype=torch_dtype, base_model_name_or_path="random",
    )
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in cfg.tensor_shapes().items():
        if key.endswith("act.numerator"):
            t = torch.tensor(RATIONAL_GELU_NUMERATOR) + 0.01 * torch.randn(shape, generator=g)
        elif key.endswith("act.denominator"):
            t = torch.tensor(RATIONAL_GELU_DENOMINATOR) + 0.01 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1]
            t = scale * torch.randn(shape, generator=g) / fan_in**0.5
        tensors[key] = t
    save_adapter(Path(out_dir), cfg, tensors)
    return cfg
