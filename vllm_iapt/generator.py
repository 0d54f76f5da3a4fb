"""The IAPT prompt generator: the math of docs/iapt.md, sections 3-4, written once.

Both the transformers reference model (training, generation) and the vLLM layers
call the functions here, so the engine cannot drift from the reference. Every
function computes in float32 whatever the input dtype (docs/iapt.md, section 3) and returns
float32; callers cast ``S`` to the model dtype when they write the soft rows.

Two batch layouts are supported because the two sides see sequences differently:

* packed (vLLM): instruction rows of many sequences concatenated, ``(T, d)``, with
  ``cu_seqlens`` (``B + 1`` offsets, like ``query_start_loc``);
* padded (training): ``(B, N, d)`` with a boolean ``mask`` of instruction rows.

Pooling is a softmax over one sequence's instruction rows only, so no sequence
ever sees another's rows, padding, soft rows or generated tokens.

The engine adds a third entry point, :func:`generate_grouped`: the generators of
*several adapters* (one group of packed sequences each, with different ``m``,
``r``, activations) in one batched computation whose number of operations does not
depend on the number of groups. It is the same math as :func:`generate_packed`
(same activation code, same segment softmax), padded and tiled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["rational", "gelu", "relu", "silu", "identity"]

# docs/iapt.md, section 4: Padé "version B" coefficients approximating GELU on [-3, 3].
RATIONAL_GELU_NUMERATOR = (
    -0.000422107, 0.499999555, 0.402705354, 0.073669769, -0.012954788, -0.003741400,
)
RATIONAL_GELU_DENOMINATOR = (0.000049585, 0.147297741, 0.000011646, -0.007483872)


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``P(x) / (1 + |x * Q(x)|)`` with ascending-power coefficients, in float32.

    ``numerator`` is ``[a0 .. ap]``; ``denominator`` is ``[b1 .. bq]`` (no constant
    term: the 1 is implicit, which keeps the denominator >= 1). The coefficients
    run along the last dimension; leading dimensions, if any, broadcast against
    ``x`` (one coefficient set per batch entry, for :func:`generate_grouped`).
    Zero coefficients appended at the high powers leave every value bit-for-bit
    unchanged (Horner then starts with exact zeros), which is how coefficient
    sets of different degrees are batched.
    """
    x = x.float()
    a = numerator.float()
    b = denominator.float()
    num = a[..., -1].expand_as(x)
    for i in range(a.shape[-1] - 2, -1, -1):  # Horner
        num = num * x + a[..., i]
    den = b[..., -1].expand_as(x)
    for i in range(b.shape[-1] - 2, -1, -1):
        den = den * x + b[..., i]
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
    """One layer's generator tensors (docs/iapt.md, section 6 names in comments).

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
    #: Set by :meth:`flattened`: ``W_up^T`` ``(r, d)``, contiguous (``up_weight`` is its
    #: transposed view), and ``flat = [b_down, Q, numerator, denominator]`` (1-D), so
    #: that :func:`generate_grouped` gathers any number of adapters' weights with a
    #: few ``cat``\ s per layer. The flattened tensors are views of one ``(2r + 1, d)``
    #: buffer ``[W_down; W_up^T; b_up]`` and of ``flat``: same bytes as before.
    up_rows: torch.Tensor | None = field(default=None, repr=False, compare=False)
    flat: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_soft_tokens(self) -> int:
        return self.query.shape[0]

    @property
    def bottleneck_dim(self) -> int:
        return self.down_weight.shape[0]

    def signature(self) -> tuple:
        """What :func:`grouped_layout` needs to know: ``(r, m, numerator length,
        denominator length, activation)``. Host metadata only (no device read)."""
        p = 0 if self.numerator is None else self.numerator.shape[0]
        q = 0 if self.denominator is None else self.denominator.shape[0]
        return (self.bottleneck_dim, self.num_soft_tokens, p, q, self.activation)

    def flattened(self, device: torch.device | str) -> "GeneratorWeights":
        """These weights in float32 on ``device``, laid out for :func:`generate_grouped`
        (see ``up_rows`` and ``flat``; two uploads); what the engine keeps resident."""
        down, up_rows, up_bias, flat = _batch_parts(self)
        rows = torch.cat([down, up_rows, up_bias.unsqueeze(0)]).to(device)
        return _flattened_views(rows, flat.to(device), *self.signature())

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "GeneratorWeights":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return GeneratorWeights(
            mv(self.down_weight), mv(self.down_bias), mv(self.query), mv(self.up_weight),
            mv(self.up_bias), self.activation, mv(self.numerator), mv(self.denominator),
        )


#: Each part of a :class:`PackedGenerators` buffer starts on a multiple of this many
#: float32 elements (64 bytes), so every view is as aligned as a buffer of its own.
_PACK_ALIGN = 16


@dataclass(frozen=True)
class PackedGenerators:
    """All of one adapter's generators in one float32 buffer, each laid out as
    :meth:`GeneratorWeights.flattened` lays it out, so that moving an adapter to the
    device is one copy (asynchronous from pinned host memory) and a device that is
    the host (CPU) takes the buffer as it is, with no copy at all.

    ``layout`` holds per layer ``(layer, rows offset, flat offset, r, m, p, q,
    activation)``; :meth:`unpack` gives the layers' weights as views of ``buffer``.
    """

    buffer: torch.Tensor  # 1-D float32
    hidden_size: int
    layout: tuple[tuple[int, int, int, int, int, int, int, str], ...]

    @classmethod
    def pack(cls, layers: dict[int, GeneratorWeights], hidden_size: int, pin: bool = False) -> "PackedGenerators":
        def aligned(n: int) -> int:
            return -(-n // _PACK_ALIGN) * _PACK_ALIGN

        layout, offset = [], 0
        for layer, w in sorted(layers.items()):
            r, m, p, q, act = w.signature()
            rows_at, flat_at = offset, offset + aligned((2 * r + 1) * hidden_size)
            offset = flat_at + aligned(r + m * r + p + q)
            layout.append((layer, rows_at, flat_at, r, m, p, q, act))
        buffer = torch.zeros(offset, dtype=torch.float32, pin_memory=pin)
        for (layer, rows_at, flat_at, r, *_), w in zip(layout, (layers[k] for k in sorted(layers))):
            down, up_rows, up_bias, flat = _batch_parts(w)
            rows = buffer[rows_at:rows_at + (2 * r + 1) * hidden_size].view(2 * r + 1, hidden_size)
            rows[:r], rows[r:2 * r], rows[2 * r] = down, up_rows, up_bias
            buffer[flat_at:flat_at + flat.numel()] = flat
        return cls(buffer, hidden_size, tuple(layout))

    def nbytes(self) -> int:
        return self.buffer.numel() * 4

    def to(self, device: torch.device | str) -> "PackedGenerators":
        """On ``device``: one copy, none if the buffer is there already."""
        return PackedGenerators(self.buffer.to(device, non_blocking=True), self.hidden_size, self.layout)

    def unpack(self) -> dict[int, GeneratorWeights]:
        """Every layer's generator, as :meth:`GeneratorWeights.flattened` views of the buffer."""
        d, out = self.hidden_size, {}
        for layer, rows_at, flat_at, r, m, p, q, act in self.layout:
            rows = self.buffer[rows_at:rows_at + (2 * r + 1) * d].view(2 * r + 1, d)
            flat = self.buffer[flat_at:flat_at + r + m * r + p + q]
            out[layer] = _flattened_views(rows, flat, r, m, p, q, act)
        return out


def _flattened_views(rows: torch.Tensor, flat: torch.Tensor, r: int, m: int, p: int, q: int,
                     activation: str) -> GeneratorWeights:
    """A generator over ``rows = [W_down; W_up^T; b_up]`` and ``flat = [b_down, Q,
    numerator, denominator]`` (``p``/``q`` 0: no such coefficients)."""
    o = r + m * r
    return GeneratorWeights(
        rows[:r], flat[:r], flat[r:o].view(m, r), rows[r:2 * r].T, rows[2 * r], activation,
        flat[o:o + p] if p else None, flat[o + p:o + p + q] if q else None,
        up_rows=rows[r:2 * r], flat=flat,
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
    return _project_out(w, _segment_pool(z, u, seg, num_seqs))


def _segment_pool(z: torch.Tensor, u: torch.Tensor, seg: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``P = A^T Z`` per sequence with ``A`` the softmax of the scores ``u`` over
    each sequence's rows: ``z`` ``(T, r)``, ``u`` ``(T, m)``, ``seg`` ``(T,)`` each
    row's sequence in ``[0, num_seqs)``. Scatter reductions, no loop, no padding;
    returns ``(num_seqs, m, r)``."""
    m = u.shape[1]
    seg_m = seg.unsqueeze(1).expand(-1, m)
    seg_max = torch.full((num_seqs, m), float("-inf"), device=u.device, dtype=u.dtype)
    seg_max = seg_max.scatter_reduce(0, seg_m, u, reduce="amax", include_self=True)
    e = torch.exp(u - seg_max.index_select(0, seg))
    denom = torch.zeros((num_seqs, m), device=u.device, dtype=u.dtype).index_add_(0, seg, e)
    a = e / denom.index_select(0, seg)  # (T, m)
    pooled = torch.zeros((num_seqs, m, z.shape[1]), device=z.device, dtype=z.dtype)
    return pooled.index_add_(0, seg, a.unsqueeze(2) * z.unsqueeze(1))  # (B, m, r)


# ---------------------------------------------------------------------------
# Many adapters in one computation (the engine's soft-row op)

#: Activation of each up-projection tile in :class:`GroupedLayout`, as a small int.
ACTIVATION_CODES: dict[str, int] = {"rational": 0, "gelu": 1, "relu": 2, "silu": 3, "identity": 4}


def _batch_parts(w: GeneratorWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_down, W_up^T, b_up, flat)`` of ``w`` in float32 (see :class:`GeneratorWeights`):
    views if ``w`` was :meth:`~GeneratorWeights.flattened`, else made on the spot (a
    few operations per generator)."""
    if w.up_rows is not None and w.flat is not None:
        return w.down_weight, w.up_rows, w.up_bias, w.flat
    parts = [w.down_bias, w.query] + [t for t in (w.numerator, w.denominator) if t is not None]
    return (w.down_weight.float(), w.up_weight.float().T, w.up_bias.float(),
            torch.cat([t.float().reshape(-1) for t in parts]))


def _tile_size(lengths: Sequence[int], width: int) -> int:
    """Rows per tile for groups of ``lengths`` rows whose tiles each gather ``width``
    weight rows: the candidate with the least padded work, ``sum(ceil(n / c)) * (c +
    width)``. Among the candidates is ``ceil(total / groups)``, for which the padded
    rows and the gathered weights are each at most twice the unpadded ones."""
    top = max(lengths, default=0)
    if top <= 1:
        return 1
    candidates = {top, -(-sum(lengths) // len(lengths))} | {1 << i for i in range(top.bit_length())}
    return min(candidates, key=lambda c: (sum(-(-n // c) for n in lengths) * (c + width), -c))


@dataclass(frozen=True)
class GroupedLayout:
    """Where the rows of several groups go in one :func:`generate_grouped` call.

    A group is one adapter's sequences (packed instruction rows, as for
    :func:`generate_packed`). The instruction rows of all groups are cut into
    ``num_tiles`` tiles of ``tile`` rows, each tile holding rows of one group only
    (a group's last tile is padded), so one batched matmul applies every group's own
    down projection; the soft rows likewise, in ``num_out_tiles`` tiles of
    ``out_tile`` rows, for the up projection. Weights are zero-padded to the largest
    ``r``, ``m`` and coefficient counts, which changes no value that is kept; padding
    rows pool into a spare sequence (index ``num_seqs``) that is never read.

    Built by :func:`grouped_layout` from shapes (host ints) and the groups' row
    tensors, once per step, with one host-to-device copy; every layer whose
    generators have the same :meth:`GeneratorWeights.signature`\\ s reuses it.
    """

    signature: tuple  # the groups' weight signatures, in order
    num_seqs: int  # sum of the groups' sequences
    r: int  # largest bottleneck
    m: int  # largest number of soft tokens
    p: int  # largest numerator length (0: no rational activation)
    q: int  # largest denominator length
    tile: int
    num_tiles: int
    out_tile: int
    num_out_tiles: int
    x_rows: torch.Tensor  # (num_tiles * tile,) row of the stream for each slot (padding: a valid row)
    seg: torch.Tensor  # (num_tiles * tile,) sequence of each slot, groups numbered on (padding: num_seqs)
    pooled_rows: torch.Tensor  # (num_out_tiles * out_tile,) row of the pooled (num_seqs + 1) * m rows per slot
    out_rows: torch.Tensor  # (sum_g B_g m_g,) slot of each soft row: groups in order, sequence-major
    down_tiles: tuple  # per tile: (its group, rows of zero padding after its W_down)
    up_tiles: tuple  # per up-projection tile: (its group, rows of zero padding after its W_up^T)
    up_tile_group: torch.Tensor  # (num_out_tiles,) group of each up-projection tile
    down_bias_idx: torch.Tensor  # (num_tiles * r,) elements of the concatenated ``flat`` buffers (padding: a zero)
    query_idx: torch.Tensor  # (num_tiles * m * r,)
    numerator_idx: torch.Tensor  # (num_out_tiles * p,)
    denominator_idx: torch.Tensor  # (num_out_tiles * q,)
    kinds: tuple  # ((activation, (num_out_tiles, 1, 1) bool mask of its tiles, None for the first), ...)
    zero_rows: dict  # padding size -> (size, d) float32 zeros (views of one buffer)
    zero_flat: torch.Tensor  # (1,) float32


def grouped_layout(
    weights: Sequence[GeneratorWeights],
    rows: Sequence[torch.Tensor],
    segment_ids: Sequence[torch.Tensor],
    num_seqs: Sequence[int],
) -> GroupedLayout:
    """The :class:`GroupedLayout` of ``len(weights)`` groups.

    ``weights[g]``: group ``g``'s generator (only its shapes and activation are
    read); ``rows[g]``: ``(T_g,)`` int64, the rows of the stream holding ``g``'s
    instruction rows, sequence after sequence; ``segment_ids[g]``: ``(T_g,)`` int64,
    the sequence (``0 .. num_seqs[g] - 1``) of each of those rows; ``num_seqs[g]``:
    a host int. Reads no device data on the host (only shapes): index arithmetic is
    done in numpy and copied to the device once, pinned and non-blocking on CUDA.
    """
    num_groups = len(weights)
    if num_groups == 0 or not len(rows) == len(segment_ids) == len(num_seqs) == num_groups:
        raise ValueError("grouped_layout needs one rows, segment_ids and num_seqs entry per group, and a group")
    device = rows[0].device
    sig = tuple(w.signature() for w in weights)
    d = weights[0].down_weight.shape[1]
    lengths = [int(t.shape[0]) for t in rows]
    seqs = [int(b) for b in num_seqs]
    soft = [b * s[1] for b, s in zip(seqs, sig)]
    R, M, P, Q = (max(s[i] for s in sig) for i in range(4))
    tile, out_tile = _tile_size(lengths, R), _tile_size(soft, R)
    tiles = [-(-n // tile) for n in lengths]
    out_tiles = [-(-n // out_tile) for n in soft]
    NT, NT2, B = sum(tiles), sum(out_tiles), sum(seqs)
    zero_flat = sum(s[0] + s[1] * s[0] + s[2] + s[3] for s in sig)

    pos = np.zeros(NT * tile, np.int64)  # slot -> position in the concatenated rows[g] (padding: 0)
    keep = np.zeros(NT * tile, np.int64)
    seg_off = np.full(NT * tile, B, np.int64)
    pooled_rows = np.zeros(NT2 * out_tile, np.int64)
    out_rows = np.zeros(sum(soft), np.int64)
    down_bias = np.full((NT, R), zero_flat, np.int64)
    query = np.full((NT, M, R), zero_flat, np.int64)
    up_group = np.zeros(NT2, np.int64)
    numerator = np.full((NT2, P), zero_flat, np.int64)
    denominator = np.full((NT2, Q), zero_flat, np.int64)
    codes = np.zeros(NT2, np.int64)
    flat_base = t0 = o0 = x0 = s0 = b0 = 0
    for g, (r, m, p, q, act) in enumerate(sig):
        n, t1, o1 = lengths[g], t0 + tiles[g], o0 + out_tiles[g]
        a = t0 * tile
        pos[a:a + n] = x0 + np.arange(n)
        keep[a:a + n] = 1
        seg_off[a:a + n] = b0
        down_bias[t0:t1, :r] = flat_base + np.arange(r)
        query[t0:t1, :m, :r] = flat_base + r + np.arange(m * r).reshape(m, r)
        k = np.arange(soft[g])  # soft row k of the group is slot k % m of its sequence k // m
        pooled_rows[o0 * out_tile + k] = (b0 + k // m) * M + k % m
        out_rows[s0:s0 + soft[g]] = o0 * out_tile + k
        up_group[o0:o1] = g
        numerator[o0:o1, :p] = flat_base + r + m * r + np.arange(p)
        denominator[o0:o1, :q] = flat_base + r + m * r + p + np.arange(q)
        codes[o0:o1] = ACTIVATION_CODES[act]
        flat_base += r + m * r + p + q
        t0, o0, x0, s0, b0 = t1, o1, x0 + n, s0 + soft[g], b0 + seqs[g]

    parts = [pos, keep, seg_off, pooled_rows, out_rows, up_group, down_bias, query, numerator, denominator, codes]
    host = torch.from_numpy(np.concatenate([a.reshape(-1) for a in parts]))
    if device.type == "cuda":
        host = host.pin_memory()
    (pos_t, keep_t, seg_off_t, pooled_t, out_t, up_group_t, down_bias_t, query_t, num_t, den_t,
     codes_t) = host.to(device, non_blocking=True).split([a.size for a in parts])
    zeros = torch.zeros((R, d), device=device)
    down_tiles = tuple((g, R - sig[g][0]) for g in range(num_groups) for _ in range(tiles[g]))
    up_tiles = tuple((g, R - sig[g][0]) for g in range(num_groups) for _ in range(out_tiles[g]))
    present = sorted({s[4] for s in sig}, key=ACTIVATION_CODES.__getitem__)
    kinds = tuple((kind, None if i == 0 else (codes_t == ACTIVATION_CODES[kind]).view(NT2, 1, 1))
                  for i, kind in enumerate(present))
    return GroupedLayout(
        signature=sig, num_seqs=B, r=R, m=M, p=P, q=Q, tile=tile, num_tiles=NT, out_tile=out_tile, num_out_tiles=NT2,
        x_rows=torch.cat(list(rows)).index_select(0, pos_t),
        seg=torch.cat(list(segment_ids)).index_select(0, pos_t) * keep_t + seg_off_t,
        pooled_rows=pooled_t, out_rows=out_t, down_tiles=down_tiles, up_tiles=up_tiles, up_tile_group=up_group_t,
        down_bias_idx=down_bias_t, query_idx=query_t, numerator_idx=num_t, denominator_idx=den_t, kinds=kinds,
        zero_rows={k: zeros[:k] for k in {R - s[0] for s in sig} if k}, zero_flat=torch.zeros(1, device=device),
    )


def generate_grouped(
    weights: Sequence[GeneratorWeights],
    layout: GroupedLayout,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft rows of several groups, each pooled by its own generator, in one batched
    computation.

    ``weights[g]`` is group ``g``'s generator, with the signatures ``layout`` was
    built for; ``x`` ``(N, d)`` is the stream the layout's rows index, or with
    ``residual`` the stream is ``x + residual`` (vLLM's split residual; added on the
    pooled rows only). Returns ``S``: ``(sum_g B_g m_g, d)`` in float32, group after
    group, sequence-major: what concatenating ``generate_packed(weights[g], ...)
    .flatten(0, 1)`` over the groups gives, up to float rounding (same activation
    code, same segment softmax; the matmuls are batched and zero-padded).

    The operations are the same whatever the number of groups: their count depends
    only on the activations present and the largest coefficient counts. Nothing reads
    device data on the host. Pass :meth:`GeneratorWeights.flattened` weights (the
    engine's): their parts are then gathered with one ``cat`` each.
    """
    L = layout
    if tuple(w.signature() for w in weights) != L.signature:
        raise ValueError("generate_grouped: the weights do not have the shapes the layout was built for")
    d = x.shape[1]
    parts = [_batch_parts(w) for w in weights]
    flat = torch.cat([w[3] for w in parts] + [L.zero_flat])
    # Z = X W_down^T + b_down and U = Z Q^T, each tile with its own group's weights.
    xs = x.index_select(0, L.x_rows)
    if residual is not None:
        xs = xs.add_(residual.index_select(0, L.x_rows))
    xs = xs.float().view(L.num_tiles, L.tile, d)
    w_down = torch.cat(_tiled(L.down_tiles, [w[0] for w in parts], L.zero_rows)).view(L.num_tiles, L.r, d)
    b_down = flat.index_select(0, L.down_bias_idx).view(L.num_tiles, 1, L.r)
    query = flat.index_select(0, L.query_idx).view(L.num_tiles, L.m, L.r)
    z = torch.baddbmm(b_down, xs, w_down.transpose(1, 2))  # (tiles, tile, r)
    u = torch.bmm(z, query.transpose(1, 2))  # (tiles, tile, m)
    # P = A^T Z per sequence; padding slots pool into the spare last sequence.
    pooled = _segment_pool(z.view(-1, L.r), u.view(-1, L.m), L.seg, L.num_seqs + 1)
    p = pooled.view(-1, L.r).index_select(0, L.pooled_rows).view(L.num_out_tiles, L.out_tile, L.r)
    # S = R(P) W_up^T + b_up, each tile with its own group's activation and weights.
    num = flat.index_select(0, L.numerator_idx).view(L.num_out_tiles, 1, 1, L.p) if L.p else None
    den = flat.index_select(0, L.denominator_idx).view(L.num_out_tiles, 1, 1, L.q) if L.q else None
    g = p
    for kind, mask in L.kinds:
        y = apply_activation(kind, p, num, den)
        g = y if mask is None else torch.where(mask, y, g)
    w_up = torch.cat(_tiled(L.up_tiles, [w[1] for w in parts], L.zero_rows)).view(L.num_out_tiles, L.r, d)
    b_up = torch.cat([w[2] for w in parts]).view(-1, d).index_select(0, L.up_tile_group).view(-1, 1, d)
    s = torch.baddbmm(b_up, g, w_up)  # (out tiles, out_tile, d)
    return s.view(-1, d).index_select(0, L.out_rows)


def _tiled(tiles: tuple, mats: list, zero_rows: dict) -> list:
    """The list whose ``cat`` stacks ``mats[g]`` once per tile of group ``g``, each
    zero-padded to the layout's largest ``r`` (one copy, no per-group operation)."""
    out = []
    for g, pad in tiles:
        out.append(mats[g])
        if pad:
            out.append(zero_rows[pad])
    return out


class LayerGenerator(nn.Module):
    """Trainable parameters of one layer's generator, initialised for training.

    Initialisation (chosen; docs/iapt.md, section 8): small random down/up projections and
    queries, zero biases, rational coefficients approximating GELU (docs/iapt.md, section 4).
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
