"""The IAPT prompt generator: the math of IAPT_SPEC sections 3-4, written once.

Both the transformers reference model (training, generation) and the vLLM layers
call the functions here, so the engine cannot drift from the reference. Every
function computes in float32 whatever the input dtype (spec section 3) and returns
float32; callers cast ``S`` to the model dtype when they write the soft rows.

Two batch layouts are supported because the two sides see sequences differently:

* packed (vLLM): instruction rows of many sequences concatenated, ``(T, d)``, with
  ``cu_seqlens`` (``B + 1`` offsets, like ``query_start_loc``);
* padded (training): ``(B, N, d)`` with a boolean ``mask`` of instruction rows.

Pooling is a softmax over one sequence's instruction rows only, so no sequence
ever sees another's rows, padding, soft rows or generated tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["rational", "gelu", "relu", "silu", "identity"]

# Spec section 4: Padé "version B" coefficients approximating GELU on [-3, 3].
RATIONAL_GELU_NUMERATOR = (
    -0.000422107, 0.499999555, 0.402705354, 0.073669769, -0.012954788, -0.003741400,
)
RATIONAL_GELU_DENOMINATOR = (0.000049585, 0.147297741, 0.000011646, -0.007483872)


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``P(x) / (1 + |x * Q(x)|)`` with ascending-power coefficients, in float32.

    ``numerator`` is ``[a0 .. ap]``; ``denominator`` is ``[b1 .. bq]`` (no constant
    term: the 1 is implicit, which keeps the denominator >= 1).
    """
    x = x.float()
    a = numerator.float()
    b = denominator.float()
    num = a[-1].expand_as(x)
    for i in range(a.numel() - 2, -1, -1):  # Horner
        num = num * x + a[i]
    den = b[-1].expand_as(x)
    for i in range(b.numel() - 2, -1, -1):
        den = den * x + b[i]
    return num / (1.0 + (den * x).abs())


def apply_activation(
    kind: Activation,
    x: torch.Tensor,
    numerator: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    x = x.float()
    if kind == "rational":
        assert numerator is not None and denominator is not None
        return rational(x, numerator, denominator)
    if kind == "gelu":
        return F.gelu(x)  # exact erf form
    if kind == "relu":
        return F.relu(x)
    if kind == "silu":
        return F.silu(x)
    if kind == "identity":
        return x
    raise ValueError(f"unknown IAPT activation {kind!r}")


@dataclass(frozen=True)
class GeneratorWeights:
    """One layer's generator tensors (spec section 6 names in comments).

    Kept as plain tensors so the engine can hold them in device slots without
    ``nn.Module`` overhead; :class:`LayerGenerator` exposes its parameters as one.
    """

    down_weight: torch.Tensor  # layers.{l}.down.weight  (r, d)
    down_bias: torch.Tensor  # layers.{l}.down.bias    (r,)
    query: torch.Tensor  # layers.{l}.pool.query   (m, r)
    up_weight: torch.Tensor  # layers.{l}.up.weight    (d, r)
    up_bias: torch.Tensor  # layers.{l}.up.bias      (d,)
    activation: Activation
    numerator: torch.Tensor | None = None  # layers.{l}.act.numerator
    denominator: torch.Tensor | None = None  # layers.{l}.act.denominator

    @property
    def num_soft_tokens(self) -> int:
        return self.query.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "GeneratorWeights":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return GeneratorWeights(
            mv(self.down_weight), mv(self.down_bias), mv(self.query), mv(self.up_weight),
            mv(self.up_bias), self.activation, mv(self.numerator), mv(self.denominator),
        )


def _project_out(w: GeneratorWeights, pooled: torch.Tensor) -> torch.Tensor:
    """``S = R(P) @ W_up.T + b_up`` for pooled ``P`` of shape ``(..., m, r)``."""
    g = apply_activation(w.activation, pooled, w.numerator, w.denominator)
    return F.linear(g, w.up_weight.float(), w.up_bias.float())


def _project_in(w: GeneratorWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Z = X @ W_down.T + b_down`` and the pooling scores ``U = Z @ Q.T``."""
    z = F.linear(x.float(), w.down_weight.float(), w.down_bias.float())
    return z, z @ w.query.float().T


def generate_padded(w: GeneratorWeights, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft rows for a padded batch.

    ``x``: ``(B, N, d)`` hidden states; ``mask``: ``(B, N)`` bool, True on the
    instruction rows to pool (every sequence needs at least one). Returns
    ``S``: ``(B, m, d)`` in float32.
    """
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every sequence needs at least one instruction row to pool")
    z, u = _project_in(w, x)  # (B, N, r), (B, N, m)
    u = u.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    a = torch.softmax(u, dim=1)  # over the instruction rows of each sequence
    pooled = torch.einsum("bnm,bnr->bmr", a, z)
    return _project_out(w, pooled)


def generate_packed(
    w: GeneratorWeights, x: torch.Tensor, cu_seqlens: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft rows for packed sequences.

    ``x``: ``(T, d)``, the instruction rows of ``B`` sequences back to back;
    ``cu_seqlens``: ``(B + 1,)`` int offsets, ``cu_seqlens[0] == 0``, each segment
    non-empty. Returns ``S``: ``(B, m, d)`` in float32. No Python loop over
    sequences: the segment softmax uses scatter reductions, so the cost is
    proportional to ``T`` whatever the number of sequences. ``segment_ids`` (each
    row's sequence index, derivable from ``cu_seqlens``) may be passed by callers
    that run many layers over the same batch, so it is computed once per step.
    """
    num_seqs = cu_seqlens.numel() - 1
    seg = segment_ids
    if seg is None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seg = torch.repeat_interleave(torch.arange(num_seqs, device=x.device), lengths, output_size=x.shape[0])
    z, u = _project_in(w, x)  # (T, r), (T, m)
    m = u.shape[1]
    seg_m = seg.unsqueeze(1).expand(-1, m)
    seg_max = torch.full((num_seqs, m), float("-inf"), device=x.device, dtype=u.dtype)
    seg_max = seg_max.scatter_reduce(0, seg_m, u, reduce="amax", include_self=True)
    e = torch.exp(u - seg_max.index_select(0, seg))
    denom = torch.zeros((num_seqs, m), device=x.device, dtype=u.dtype).index_add_(0, seg, e)
    a = e / denom.index_select(0, seg)  # (T, m)
    pooled = torch.zeros((num_seqs, m, z.shape[1]), device=x.device, dtype=z.dtype)
    pooled.index_add_(0, seg, a.unsqueeze(2) * z.unsqueeze(1))  # (B, m, r)
    return _project_out(w, pooled)


class LayerGenerator(nn.Module):
    """Trainable parameters of one layer's generator, initialised for training.

    Initialisation (chosen, not in the spec): small random down/up projections and
    queries, zero biases, rational coefficients approximating GELU (spec section 4).
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_dim: int,
        num_soft_tokens: int,
        activation: Activation,
        numerator_degree: int = 5,
        denominator_degree: int = 4,
    ) -> None:
        super().__init__()
        self.activation: Activation = activation
        self.down = nn.Linear(hidden_size, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, hidden_size)
        self.query = nn.Parameter(torch.empty(num_soft_tokens, bottleneck_dim))
        if activation == "rational":
            self.numerator = nn.Parameter(_init_coefficients(RATIONAL_GELU_NUMERATOR, numerator_degree + 1))
            self.denominator = nn.Parameter(_init_coefficients(RATIONAL_GELU_DENOMINATOR, denominator_degree))
        else:
            self.numerator = self.denominator = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d, r = self.up.out_features, self.down.out_features
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(d))
        nn.init.zeros_(self.down.bias)
        nn.init.normal_(self.query, std=1.0 / math.sqrt(r))
        nn.init.normal_(self.up.weight, std=0.02 / math.sqrt(r))
        nn.init.zeros_(self.up.bias)

    def weights(self) -> GeneratorWeights:
        return GeneratorWeights(
            self.down.weight, self.down.bias, self.query, self.up.weight, self.up.bias,
            self.activation, self.numerator, self.denominator,
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return generate_padded(self.weights(), x, mask)


def _init_coefficients(values: tuple[float, ...], n: int) -> torch.Tensor:
    """The GELU-fitted coefficients, truncated or zero-padded to ``n`` terms."""
    out = torch.zeros(n, dtype=torch.float32)
    k = min(n, len(values))
    out[:k] = torch.tensor(values[:k], dtype=torch.float32)
    return out
