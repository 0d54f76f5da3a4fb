"""Spec sections 3-4: the generator math, pooling isolation, packed == padded."""

import pytest
import torch
import torch.nn.functional as F

from vllm_iapt.generator import (
    GeneratorWeights, LayerGenerator, RATIONAL_GELU_DENOMINATOR, RATIONAL_GELU_NUMERATOR,
    generate_packed, generate_padded, rational,
)

D, R, M = 32, 8, 4


def weights(activation="rational", seed=0) -> GeneratorWeights:
    g = torch.Generator().manual_seed(seed)
    gen = LayerGenerator(D, R, M, activation)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    return gen.weights()


def spec_generator(w: GeneratorWeights, x: torch.Tensor) -> torch.Tensor:
    """IAPT_SPEC section 3, transcribed line by line for one sequence (n, d)."""
    x = x.double()
    z = x @ w.down_weight.double().T + w.down_bias.double()
    u = z @ w.query.double().T
    a = torch.softmax(u, dim=0)
    p = a.T @ z
    if w.activation == "rational":
        a_, b_ = w.numerator.double(), w.denominator.double()
        num = sum(a_[i] * p**i for i in range(6))
        den = 1 + (sum(b_[j - 1] * p**j for j in range(1, 5))).abs()
        g = num / den
    else:
        g = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "identity": lambda t: t}[w.activation](p)
    return g @ w.up_weight.double().T + w.up_bias.double()


def test_rational_init_approximates_gelu():
    x = torch.linspace(-3, 3, 2001)
    y = rational(x, torch.tensor(RATIONAL_GELU_NUMERATOR), torch.tensor(RATIONAL_GELU_DENOMINATOR))
    err = (y - F.gelu(x)).abs().max().item()
    assert err < 0.03, err
    assert err < 0.002  # the spec says "about 0.001" on [-3, 3]


def test_rational_computes_in_float32_for_half_inputs():
    x = torch.linspace(-3, 3, 101, dtype=torch.bfloat16)
    y = rational(x, torch.tensor(RATIONAL_GELU_NUMERATOR).bfloat16(), torch.tensor(RATIONAL_GELU_DENOMINATOR).bfloat16())
    assert y.dtype == torch.float32


@pytest.mark.parametrize("activation", ["rational", "gelu", "relu", "silu", "identity"])
def test_matches_spec_formulas(activation):
    w = weights(activation)
    x = torch.randn(7, D)
    got = generate_packed(w, x, torch.tensor([0, 7]))[0]
    torch.testing.assert_close(got.double(), spec_generator(w, x), rtol=1e-4, atol=1e-5)
    got_padded = generate_padded(w, x[None], torch.ones(1, 7, dtype=torch.bool))[0]
    torch.testing.assert_close(got_padded.double(), spec_generator(w, x), rtol=1e-4, atol=1e-5)


def test_packed_and_padded_agree_and_sequences_are_isolated():
    w = weights()
    lengths = [1, 5, 13, 2]
    seqs = [torch.randn(n, D) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    packed = generate_packed(w, torch.cat(seqs), cu)
    width = max(lengths) + 3
    x = torch.randn(len(seqs), width, D) * 50  # garbage in the padding
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
        mask[i, : len(s)] = True
    padded = generate_padded(w, x, mask)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(packed[i], spec_generator(w, s).float(), rtol=1e-4, atol=1e-4)

    # Perturbing one sequence changes its own soft rows and nobody else's.
    seqs2 = [s.clone() for s in seqs]
    seqs2[2] += torch.randn_like(seqs2[2])
    packed2 = generate_packed(w, torch.cat(seqs2), cu)
    assert not torch.allclose(packed2[2], packed[2])
    for i in (0, 1, 3):
        torch.testing.assert_close(packed2[i], packed[i], rtol=0, atol=0)


def test_padded_pooling_ignores_masked_rows():
    w = weights()
    x = torch.randn(2, 9, D)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :2] = False  # e.g. soft rows
    mask[0, 6:] = False  # e.g. generated tokens / padding
    base = generate_padded(w, x, mask)
    x2 = x.clone()
    x2[0, :2] = 1e3
    x2[0, 6:] = -1e3
    torch.testing.assert_close(generate_padded(w, x2, mask), base, rtol=0, atol=0)


def test_empty_instruction_is_refused():
    with pytest.raises(ValueError, match="at least one instruction row"):
        generate_padded(weights(), torch.randn(1, 3, D), torch.zeros(1, 3, dtype=torch.bool))


def test_generator_trains():
    gen = LayerGenerator(D, R, M, "rational")
    x = torch.randn(3, 5, D)
    out = gen(x, torch.ones(3, 5, dtype=torch.bool))
    out.square().mean().backward()
    assert gen.numerator.grad is not None and gen.numerator.grad.abs().sum() > 0
    assert gen.query.grad.abs().sum() > 0
