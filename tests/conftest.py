"""Shared fixtures: tiny LLaMA checkpoints and adapters, built locally (no hub)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vllm_iapt.toy import build_llama, build_tokenizer, random_adapter

WORDS = ("alpha beta gamma delta sort reverse upper count one two three four five six seven eight nine zero "
         "the a of to and in is it you that he was for on are with as I his they be at").split()


def toy_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(3, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)) + " " + " ".join(
            str(rng.randint(0, 9)) for _ in range(rng.randint(1, 6))))
    return lines


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, d=128, head_dim=64 LLaMA with a BPE tokenizer (about 0.4M parameters)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(toy_corpus(), out, vocab_size=384)
    # A wide init makes logits peaky, so greedy choices are far from ties.
    build_llama(out, vocab_size=len(tok), hidden_size=128, num_layers=2, num_heads=2,
                initializer_range=0.1, seed=0, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory, tiny_model_dir):
    """Builds random adapters for the tiny model: adapter_factory(name, **config)."""
    root = tmp_path_factory.mktemp("adapters")

    def make(name: str, **kwargs) -> Path:
        kwargs.setdefault("hidden_size", 128)
        kwargs.setdefault("num_hidden_layers", 2)
        random_adapter(root / name, **kwargs)
        return root / name

    return make
