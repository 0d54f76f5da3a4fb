"""docs/iapt.md, sections 3-4: the generator math, pooling isolation, packed == padded."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from generator_ops import per_group_loop  # noqa: E402  (the soft-row write before batching)

from vllm_iapt.generator import (
    GeneratorWeights, LayerGenerator, RATIONAL_GELU_DENOMINATOR, RATIONAL_GELU_NUMERATOR,
    generate_grouped, generate_packed, generate_padded, grouped_layout, rational,
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
    """docs/iapt.md, section 3, transcribed line by line for one sequence (n, d)."""
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
    assert err < 0.002  # docs/iapt.md, section 4, says "about 0.001" on [-3, 3]


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


# ---------------------------------------------------------------------------
# Many adapters in one computation: generate_grouped and the engine's soft-row op

#: (r, m, activation, numerator degree, denominator degree): every activation, mixed shapes.
MIXED = [(8, 4, "rational", 5, 4), (16, 2, "gelu", 5, 4), (4, 7, "identity", 5, 4), (8, 1, "silu", 5, 4),
         (3, 3, "relu", 5, 4), (8, 4, "rational", 2, 1), (5, 4, "rational", 0, 3)]


def random_weights(r, m, activation, p=5, q=4, seed=0) -> GeneratorWeights:
    g = torch.Generator().manual_seed(seed)
    gen = LayerGenerator(D, r, m, activation, p, q)
    with torch.no_grad():
        for t in gen.parameters():
            t.add_(0.3 * torch.randn(t.shape, generator=g))
    w = gen.weights()
    return GeneratorWeights(*(t.detach() if isinstance(t, torch.Tensor) else t for t in (
        w.down_weight, w.down_bias, w.query, w.up_weight, w.up_bias, w.activation, w.numerator, w.denominator)))


def packed_groups(configs, lengths, seed=0):
    """Random weights per group and the groups' instruction rows scattered over a
    stream ``x + residual`` (groups interleaved, extra rows nobody pools)."""
    g = torch.Generator().manual_seed(seed)
    ws = [random_weights(*c, seed=seed + i) for i, c in enumerate(configs)]
    total = sum(map(sum, lengths)) + 5
    x, residual = 2 * torch.randn(total, D, generator=g), torch.randn(total, D, generator=g)
    perm = torch.randperm(total, generator=g)
    rows, segs, cus, start = [], [], [], 0
    for ls in lengths:
        rows.append(perm[start:start + sum(ls)])
        start += sum(ls)
        segs.append(torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)))
        cus.append(torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist()))
    return ws, x, residual, rows, segs, cus


def per_group(ws, x, residual, rows, cus) -> torch.Tensor:
    return torch.cat([generate_packed(w, (x + residual)[r], cu).flatten(0, 1) for w, r, cu in zip(ws, rows, cus)])


SCENARIOS = {
    "mixed": (MIXED, [[1, 5, 13], [7], [2, 2], [30, 1], [4], [9, 3, 1], [6]]),
    "single_row_instructions": (MIXED, [[1]] * len(MIXED)),
    "many_groups": ([MIXED[i % len(MIXED)] for i in range(32)],
                    [[1 + (7 * i + 3 * j) % 19 for j in range(1 + i % 3)] for i in range(32)]),
    "one_group": (MIXED[:1], [[3, 8]]),
    "one_long_many_short": ([MIXED[0]] * 9, [[200, 40]] + [[1]] * 8),
}


@pytest.mark.parametrize("flattened", [True, False], ids=["flattened", "plain"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_grouped_equals_generate_packed_per_group(scenario, flattened):
    configs, lengths = SCENARIOS[scenario]
    ws, x, residual, rows, segs, cus = packed_groups(configs, lengths)
    layout = grouped_layout(ws, rows, segs, [len(ls) for ls in lengths])
    wf = [w.flattened("cpu") for w in ws] if flattened else ws
    got = generate_grouped(wf, layout, x, residual)
    want = per_group(ws, x, residual, rows, cus)
    assert got.shape == (sum(len(ls) * c[1] for ls, c in zip(lengths, configs)), D)
    # Float32, summed in another order than the per-group path (batched matmuls over
    # padded tiles): differences grow with the rows pooled, about 1e-5 of |S| here.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(generate_grouped(wf, layout, x + residual), got, rtol=1e-6, atol=1e-6)


def test_grouped_groups_are_isolated():
    ws, x, residual, rows, segs, cus = packed_groups(*SCENARIOS["mixed"])
    layout = grouped_layout(ws, rows, segs, [cu.numel() - 1 for cu in cus])
    base = generate_grouped(ws, layout, x, residual)
    x2 = x.clone()
    x2[rows[3]] += torch.randn(len(rows[3]), D)
    out = generate_grouped(ws, layout, x2, residual)
    sizes = [(cu.numel() - 1) * w.num_soft_tokens for cu, w in zip(cus, ws)]
    for g, (a, b) in enumerate(zip(base.split(sizes), out.split(sizes))):
        assert torch.equal(a, b) != (g == 3), g  # group 3's soft rows change, nobody else's


def test_grouped_refuses_weights_of_other_shapes():
    ws, x, _, rows, segs, cus = packed_groups(*SCENARIOS["mixed"])
    layout = grouped_layout(ws, rows, segs, [cu.numel() - 1 for cu in cus])
    with pytest.raises(ValueError, match="shapes the layout was built for"):
        generate_grouped(ws[::-1], layout, x)


def test_rational_zero_padded_batched_coefficients_are_bit_exact():
    x = 3 * torch.randn(3, 5, 7)
    nums, dens = [torch.randn(6), torch.randn(3), torch.randn(1)], [torch.randn(4), torch.randn(1), torch.randn(2)]
    a = torch.stack([F.pad(t, (0, 6 - len(t))) for t in nums]).view(3, 1, 1, 6)
    b = torch.stack([F.pad(t, (0, 4 - len(t))) for t in dens]).view(3, 1, 1, 4)
    got = rational(x, a, b)
    for i in range(3):
        assert torch.equal(got[i], rational(x[i], nums[i], dens[i])), i


def test_flattened_weights_are_views_of_two_buffers():
    w = random_weights(8, 4, "rational", 3, 2)
    f = w.flattened("cpu")
    assert f.signature() == w.signature() == (8, 4, 4, 2, "rational")
    assert f.up_rows.shape == (8, D) and f.up_rows.is_contiguous() and torch.equal(f.up_rows.T, w.up_weight)
    assert f.flat.shape == (8 + 4 * 8 + 4 + 2,)
    buffers = {f.up_rows.untyped_storage().data_ptr(), f.flat.untyped_storage().data_ptr()}
    for name in ("down_weight", "down_bias", "query", "up_weight", "up_bias", "numerator", "denominator"):
        t = getattr(f, name)
        assert torch.equal(t, getattr(w, name)) and t.dtype == torch.float32, name
        assert t.untyped_storage().data_ptr() in buffers, name
    x = torch.randn(9, D)
    assert torch.equal(generate_packed(f, x, torch.tensor([0, 4, 9])), generate_packed(w, x, torch.tensor([0, 4, 9])))


# -- the engine's soft-row op (vllm_iapt.engine.layers) ------------------------

NUM_LAYERS = 4


def step_plan(configs, layers_of, seqs_per_group, seed=0, device="cpu"):
    """A StepPlan as the model runner builds it: requests in batch order (groups
    interleaved, base-model requests in between), each IAPT request ``m`` slots then
    its instruction rows. Weights flattened, as the adapter manager keeps them."""
    from vllm_iapt.engine.plan import AdapterGroup, StepPlan

    g = torch.Generator().manual_seed(seed)
    ws = [random_weights(*c, seed=seed + i) for i, c in enumerate(configs)]
    soft, instr, lengths = ([[] for _ in configs] for _ in range(3))
    order = [i for _ in range(max(seqs_per_group)) for i in range(len(configs))]
    row = 0
    for k, i in enumerate(order):
        if sum(1 for j in order[:k] if j == i) >= seqs_per_group[i]:
            continue
        if k % 3 == 1:
            row += int(torch.randint(1, 6, (1,), generator=g))  # a base-model request
        m, n = configs[i][1], int(torch.randint(1, 12, (1,), generator=g))
        soft[i].append(torch.arange(row, row + m))
        instr[i].append(torch.arange(row + m, row + m + n))
        lengths[i].append(n)
        row += m + n
    groups = []
    for i, w in enumerate(ws):
        fw = w.flattened(device)
        groups.append(AdapterGroup(
            weights=[fw if layer in layers_of[i] else None for layer in range(NUM_LAYERS)],
            soft_rows=torch.cat(soft[i]).to(device), instruction_rows=torch.cat(instr[i]).to(device),
            cu_seqlens=torch.tensor([0] + torch.tensor(lengths[i]).cumsum(0).tolist()).to(device),
            segment_ids=torch.repeat_interleave(torch.arange(len(lengths[i])), torch.tensor(lengths[i])).to(device)))
    return StepPlan(groups), row


#: Layers with a generator per group of MIXED: layer 3 has none at all.
LAYERS_OF = [{0, 1, 2}, {0}, {0, 2}, {0, 1}, {0, 1, 2}, {0, 2}, {0, 1}]


@pytest.mark.parametrize("dtype,with_residual", [(torch.float32, True), (torch.float32, False),
                                                  (torch.bfloat16, True)])
def test_write_soft_rows_equals_the_per_group_loop(dtype, with_residual):
    from vllm_iapt.engine.layers import write_soft_rows

    plan, num_rows = step_plan(MIXED, LAYERS_OF, [3, 1, 2, 2, 1, 3, 2])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    for layer in range(NUM_LAYERS):
        hidden = torch.randn(num_rows, D).to(dtype)
        residual = torch.randn(num_rows, D).to(dtype) if with_residual else None
        h_want, r_want = hidden.clone(), None if residual is None else residual.clone()
        per_group_loop(plan, layer, h_want, r_want)
        h_got, r_got = hidden.clone(), None if residual is None else residual.clone()
        write_soft_rows(plan, layer, h_got, r_got)
        written = torch.cat([g.soft_rows for g in plan.groups if g.weights[layer] is not None] or
                            [torch.zeros(0, dtype=torch.long)])
        other = torch.ones(num_rows, dtype=torch.bool)
        other[written] = False  # every other row, pass-through slots included, is untouched
        assert torch.equal(h_got[other], hidden[other]) and torch.equal(h_want[other], hidden[other])
        torch.testing.assert_close(h_got[written].float(), h_want[written].float(), **tol)
        if residual is not None:
            assert torch.equal(r_got, r_want)
        if layer == 1:  # groups 1, 2 and 5 have no generator here
            assert torch.equal(h_got[plan.groups[1].soft_rows], hidden[plan.groups[1].soft_rows])
        if layer == 3:
            assert torch.equal(h_got, hidden)


class OpCounter:
    """Counts the aten ops dispatched inside the block (a TorchDispatchMode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[str(func)] = counts.get(str(func), 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_layer_calls(write, plan, num_rows):
    """Ops of the step's first layer call (which builds the layout) and of a later one."""
    hidden, residual = torch.randn(num_rows, D), torch.randn(num_rows, D)
    out = []
    for layer in (0, 1):
        with OpCounter() as c:
            write(plan, layer, hidden, residual)
        assert not any("_local_scalar_dense" in op or "item" in op for op in c.counts), c.counts  # no host read
        out.append(c.total)
    return out


@pytest.mark.parametrize("configs", ["same", "mixed"])
def test_ops_per_layer_do_not_grow_with_the_number_of_groups(configs):
    from vllm_iapt.engine.layers import write_soft_rows

    def plan_of(n):
        cfg = [MIXED[0]] * n if configs == "same" else [MIXED[i % len(MIXED)] for i in range(n)]
        return step_plan(cfg, [{0, 1}] * n, [2] * n, seed=n)

    sizes = (1, 8, 32) if configs == "same" else (8, 32)  # "mixed": every activation in both
    new = {n: count_layer_calls(write_soft_rows, *plan_of(n)) for n in sizes}
    old = {n: count_layer_calls(per_group_loop, *plan_of(n)) for n in sizes}
    assert len({tuple(v) for v in new.values()}) == 1, new  # first and later calls: the same count for any n
    assert new[32][1] < 100, new  # the whole layer call, every activation included
    # The counter does see per-group work: the old loop grows linearly.
    assert old[32][1] > 3 * old[8][1] and old[32][1] > 10 * new[32][1], (old, new)


def test_soft_row_op_runs_on_the_meta_device():
    """Nothing in the op reads a device value on the host (meta tensors have none)
    or assumes CPU tensors."""
    from vllm_iapt.engine.layers import write_soft_rows

    plan, num_rows = step_plan(MIXED, LAYERS_OF, [2] * len(MIXED), device="meta")
    hidden = torch.empty(num_rows, D, device="meta", dtype=torch.bfloat16)
    residual = torch.empty_like(hidden)
    for layer in range(NUM_LAYERS):
        write_soft_rows(plan, layer, hidden, residual)
