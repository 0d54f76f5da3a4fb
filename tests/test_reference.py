"""The transformers reference model: docs/iapt.md, sections 2, 3 and 5, on a tiny LLaMA."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_iapt.adapter import load_adapter
from vllm_iapt.reference import IAPTForCausalLM


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter(adapter_factory):
    return load_adapter(adapter_factory("ref-a", num_soft_tokens=4, bottleneck_dim=16))


PROMPT = [1, 17, 42, 99, 5, 63, 250, 7]


def test_base_model_is_bit_identical(base):
    model = IAPTForCausalLM(base)
    ids = torch.tensor([PROMPT])
    assert torch.equal(model(ids)["logits"], base(ids).logits)
    ours = model.generate(PROMPT, 8).token_ids
    theirs = base.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(PROMPT):].tolist()
    assert ours == theirs


def test_adapter_changes_outputs_and_unhooks_nothing_else(base, adapter):
    model = IAPTForCausalLM.from_pretrained(base, adapter)
    plain = IAPTForCausalLM(base)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert not torch.allclose(model(ids)["logits"], plain(ids)["logits"])
    assert model(ids)["logits"].shape == (1, len(PROMPT), base.config.vocab_size)


def test_cache_equals_recompute(base, adapter):
    model = IAPTForCausalLM.from_pretrained(base, adapter)
    cached = model.generate(PROMPT, 12, use_cache=True)
    scratch = model.generate(PROMPT, 12, use_cache=False)
    assert cached.token_ids == scratch.token_ids
    torch.testing.assert_close(torch.tensor(cached.logprobs), torch.tensor(scratch.logprobs), rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded(base, adapter):
    model = IAPTForCausalLM.from_pretrained(base, adapter)
    a = model.generate(PROMPT, 10, temperature=1.0, seed=3).token_ids
    assert a == model.generate(PROMPT, 10, temperature=1.0, seed=3).token_ids
    assert a == model.generate(PROMPT, 10, temperature=1.0, seed=3, use_cache=False).token_ids


def test_placeholder_ids_do_not_influence_outputs(base, adapter):
    model = IAPTForCausalLM.from_pretrained(base, adapter)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        a = model(ids, placeholder_id=0)["logits"]
        b = model(ids, placeholder_id=123)["logits"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.generate(PROMPT, 6, placeholder_id=0).token_ids == model.generate(PROMPT, 6, placeholder_id=77).token_ids


def test_layers_without_generator_pass_soft_rows_through(base, adapter_factory):
    only0 = load_adapter(adapter_factory("ref-layer0", layers=[0], bottleneck_dim=8))
    model = IAPTForCausalLM.from_pretrained(base, only0)
    assert list(model.generators) == ["0"]
    assert model.generate(PROMPT, 6).token_ids == model.generate(PROMPT, 6, use_cache=False).token_ids
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, placeholder_id=0)["logits"], model(ids, placeholder_id=9)["logits"],
                                   rtol=0, atol=0)


def test_padded_batch_equals_single_sequences(base, adapter):
    """Right padding, per-row instruction lengths: each row as if alone."""
    model = IAPTForCausalLM.from_pretrained(base, adapter)
    rows = [PROMPT, PROMPT[:3], PROMPT[2:] + [11, 12, 13]]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        am[i, : len(r)] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=am)["logits"]
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]))["logits"][0]
            torch.testing.assert_close(batched[i, : len(r)], alone, rtol=1e-4, atol=1e-4)


def test_only_instruction_rows_are_pooled(base, adapter):
    """With instruction_lengths < length, later tokens do not change the soft rows:
    logits of the instruction rows equal those of the instruction alone."""
    model = IAPTForCausalLM.from_pretrained(base, adapter)
    n = 5
    full = torch.tensor([PROMPT])
    with torch.no_grad():
        a = model(full, instruction_lengths=torch.tensor([n]))["logits"][0, :n]
        b = model(full[:, :n])["logits"][0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_base(tiny_model_dir, adapter):
    base16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    model = IAPTForCausalLM.from_pretrained(base16, adapter)
    out = model.generate(PROMPT, 4)
    assert len(out.token_ids) == 4


def test_save_and_reload_round_trip(base, adapter, tmp_path):
    model = IAPTForCausalLM.from_pretrained(base, adapter)
    model.save_adapter(tmp_path / "copy")
    again = IAPTForCausalLM.from_pretrained(base, tmp_path / "copy")
    assert again.generate(PROMPT, 6).token_ids == model.generate(PROMPT, 6).token_ids


def test_adapter_for_other_base_is_refused(base, adapter_factory):
    from vllm_iapt.adapter import AdapterError
    with pytest.raises(AdapterError, match="hidden_size 64, but the base model has 128"):
        IAPTForCausalLM.from_pretrained(base, adapter_factory("ref-other", hidden_size=64))
