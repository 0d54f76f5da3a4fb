"""IAPT's device memory, counted before vLLM sizes the KV cache.

vLLM sizes the KV cache from a profiling forward that has no IAPT plan, and
adapters are uploaded later, so two things IAPT puts on the device are not in that
profile: the generator weights of the adapters (float32, resident in the adapter
manager's LRU and, during a prefill step, every adapter the step needs) and the
temporaries of the soft-row op, which runs
:func:`vllm_iapt.generator.generate_grouped` once per layer over every group of
the step. ``patches/worker_memory.py`` subtracts :func:`reservation` from the
KV-cache bytes at start-up, and :class:`vllm_iapt.engine.adapter_manager.IAPTAdapterManager`
keeps every step inside it: it admits an adapter into a step only if
:func:`step_bytes` of the step's adapters, plus the resident adapters the step does
not use, stays within the reservation (evicting unused resident adapters first).
The scheduler starts at most ``REFERENCE_STEP_FACTOR x max_adapters`` adapters'
prefills per step (:mod:`vllm_iapt.engine.admission`); a step whose adapters still do
not fit runs over the reservation (logged), and an adapter that cannot fit even
alone fails its requests with a message that names the option to raise.

The bound of one step (per worker; tensor-parallel ranks each hold whole
adapters and run whole generators), :func:`step_bytes`:

    weights of the step's adapters (two float32 buffers per layer)
    + the plan's row tensors
    + for each distinct set of groups that share a layer: its grouped layout
      (index tensors kept for the whole step in ``StepPlan.cache``)
    + the largest peak of one layer call over those sets: building the layout, or
      generate_grouped phase by phase (its locals stay alive until it returns, plus
      each phase's temporaries) and the soft-row write

where a layer call's tensors are bounded from the code of
:func:`~vllm_iapt.generator.grouped_layout` / :func:`~vllm_iapt.generator.generate_grouped`
with ``T = max_num_batched_tokens`` rows in the step (instruction rows ``N`` plus
soft rows ``S``, ``N + S <= T``), ``G`` groups, the largest ``r`` (``R``), ``m``
(``M``) and rational coefficient counts (``P``, ``Q``) among them (every tile is
padded to them), ``B <= max_num_seqs`` sequences, hidden size ``d`` and the
model's element size ``e``. :func:`~vllm_iapt.generator._tile_size` picks the tile
``c`` minimising ``NT·(c + R)`` (``NT`` tiles); its candidate ``ceil(N/G)`` costs at
most ``2N + G(2R+1)`` and its candidate "one tile per group" at most ``G(N + R)``,
so the padded rows ``NT·c`` plus the per-tile weight copies ``NT·R`` are at most
``K = min(2N + G(2R+1), G(N + R))`` (likewise with ``S`` for the up projection);
the largest terms are ``K·d`` (rows and weight copies, float32, plus the rows'
``index_select`` in the model's dtype) and ``K·M·(R + 3)`` (the pooling product).
Each term grows linearly with ``N`` and with ``S``, so the bound is taken at the two
ends of ``N + S = T``. See docs/engine.md, "Memory".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from vllm_iapt.config import AdapterConfig, IAPTEngineConfig

#: The CUDA caching allocator rounds every block up to this many bytes.
GRANULE = 512
#: Allowance for allocator rounding of the small tensors of one layer call or one
#: layout (about 40 tensors each), in granules.
SMALL_TENSORS = 64

#: The adapter shape of the default reservation: the trainer's default bottleneck
#: (``vllm-iapt train --bottleneck-dim``, the SmolLM2 tenants' and docs/iapt.md's example)
REFERENCE_BOTTLENECK = 64
#: ... with up to this many soft tokens (or the prefix-hit unit, if smaller)
REFERENCE_SOFT_TOKENS = 16
#: ... and the rational activation with its default degrees (5, 4);
REFERENCE_NUMERATOR, REFERENCE_DENOMINATOR = 6, 4
#: ... this many times ``max_adapters`` of them in one step: a step may need more
#: adapters than stay resident (a burst of new tenants), and one that does not fit
#: fails some requests, so the default leaves room for as many again.
REFERENCE_STEP_FACTOR = 2


def _granules(nbytes: int) -> int:
    return -(-int(nbytes) // GRANULE) * GRANULE


@dataclass(frozen=True)
class AdapterShape:
    """What the bound needs to know of one adapter: its generator layers and
    ``(r, m, p, q)`` (the same at every layer; ``p``/``q``: rational numerator
    and denominator coefficient counts, 0 for the other activations)."""

    layers: frozenset[int]
    r: int
    m: int
    p: int = 0
    q: int = 0

    @classmethod
    def of(cls, config: AdapterConfig) -> AdapterShape:
        rational = config.activation == "rational"
        return cls(frozenset(config.generator_layers), config.bottleneck_dim, config.num_soft_tokens,
                   config.numerator_degree + 1 if rational else 0, config.denominator_degree if rational else 0)

    def device_bytes(self, hidden_size: int) -> int:
        """Bytes of its device weights, at most: per layer, two float32 parts
        ``[W_down; W_up^T; b_up]`` ``(2r + 1, d)`` and ``[b_down, Q, numerator,
        denominator]`` (views of one buffer per adapter, :class:`PackedGenerators`,
        whose parts are aligned to 64 bytes; counted here at 512-byte granules)."""
        r, m = self.r, self.m
        per_layer = _granules(4 * (2 * r + 1) * hidden_size) + _granules(4 * (r + m * r + self.p + self.q))
        return len(self.layers) * per_layer


@dataclass(frozen=True)
class StepLimits:
    """What the engine's configuration fixes about every step (per worker)."""

    max_tokens: int  # max_num_batched_tokens: rows of one step
    max_seqs: int  # max_num_seqs
    hidden_size: int
    num_layers: int
    element_size: int  # bytes per element of the model's hidden states
    max_soft_tokens: int  # the prefix-hit unit: the front end refuses adapters with more soft tokens

    @classmethod
    def of(cls, vllm_config: VllmConfig) -> StepLimits:
        from vllm_iapt.engine.frontend import prefix_hit_unit

        model, sched = vllm_config.model_config, vllm_config.scheduler_config
        text = model.hf_text_config
        return cls(int(sched.max_num_batched_tokens), int(sched.max_num_seqs), int(text.hidden_size),
                   int(text.num_hidden_layers), int(model.dtype.itemsize), prefix_hit_unit(vllm_config.cache_config))


def _tiled(rows: int, g: int, r: int) -> int:
    """Bound of ``NT·c + NT·R`` for ``rows`` rows of ``g`` groups tiled by
    :func:`~vllm_iapt.generator._tile_size` with width ``r``: its candidate
    ``ceil(rows/g)`` costs at most ``2·rows + g(2r+1)``, its candidate ``top`` (one
    tile per group) at most ``g(rows + r)``, and it picks the cheapest."""
    return min(2 * rows + g * (2 * r + 1), g * (rows + r))


def _layout_bytes(n: int, s: int, g: int, r: int, m: int, p: int, q: int, d: int) -> tuple[int, int]:
    """(bytes kept for the step, extra bytes while it is built) of one grouped layout
    and the concatenated soft rows of its groups, for ``n`` instruction rows and
    ``s`` soft rows."""
    kd, ku = _tiled(n, g, r), _tiled(s, g, r)
    nt2 = ku // (r + 1)  # tiles of the up projection (each holds >= 1 row)
    # one int64 buffer: pos, keep, seg_off (padded rows each), pooled_rows, out_rows,
    # up_group, down_bias (NT·R), query (NT·M·R), numerator, denominator, codes
    index = 8 * (3 * kd + ku + s + 2 * nt2 + kd * (1 + m) + nt2 * (p + q))
    # x_rows and seg (padded rows), the zero padding of W_down/W_up^T, the activations'
    # tile masks (at most 4 bool masks), and the soft rows of the set's groups concatenated
    kept = index + 8 * 2 * kd + 4 * r * d + 4 * nt2 + 8 * s + SMALL_TENSORS * GRANULE
    # while building: cat of the groups' rows and segment ids, the selected segment ids and their product
    building = 8 * (2 * n + 2 * kd) + nt2
    return kept, building


def _call_bytes(n: int, s: int, b: int, g: int, r: int, m: int, p: int, q: int, d: int, e: int,
                flat: int) -> int:
    """Peak bytes of one :func:`~vllm_iapt.engine.layers.write_soft_rows` call on top
    of its inputs, phase by phase of :func:`~vllm_iapt.generator.generate_grouped`:
    the locals created so far (alive until it returns) plus the phase's temporaries."""
    kd, ku = _tiled(n, g, r), _tiled(s, g, r)
    nt2 = ku // (r + 1)
    f = 4  # float32
    flat_b = f * (flat + 1)  # the groups' flat buffers concatenated
    # the stream's padded rows: index_select of hidden_states and of residual (added in place), then the
    # float32 copy while the first is alive
    rows = kd * d * max(2 * e, e + f) if e != f else kd * d * 2 * f
    # xs (float32 rows) + w_down (per-tile W_down copies): NT·c + NT·R <= kd; b_down, query; z, u
    down = f * (kd * d + kd * (1 + m) + kd * (r + m))
    # segment softmax and pooling: exp, weights and a temporary, seg_max twice, denominators, the
    # (rows, m, r) product, pooled
    pool = f * (kd * m * (r + 3) + 3 * (b + 1) * m + (b + 1) * m * r)
    pooled = f * (b + 1) * m * r
    # p, numerator, denominator; the activation: y, g, the rational's Horner temporaries (4) or torch.where
    act = f * (ku * r + nt2 * (p + q) + 6 * ku * r)
    # p, y, g kept; w_up (per-tile W_up^T copies) + s: NT2·c2 + NT2·R <= ku; b_up (and its gather); the result
    up = f * (ku * r + nt2 * (p + q) + 2 * ku * r + ku * d + nt2 * d + g * d + s * d)
    peak = max(flat_b + rows, flat_b + down + pool, flat_b + down + pooled + act, flat_b + down + pooled + up,
               s * d * (f + e))  # after: S in float32 and cast to the model's dtype for index_copy_
    return peak + SMALL_TENSORS * GRANULE


def step_bytes(shapes: Sequence[AdapterShape], limits: StepLimits) -> int:
    """Upper bound of the device bytes one prefill step uses for the adapters
    ``shapes`` (its groups): their weights, and the soft-row op's layouts and
    temporaries at ``limits.max_tokens`` rows. 0 for no adapters."""
    if not shapes:
        return 0
    d, T, e = limits.hidden_size, limits.max_tokens, limits.element_size
    weights = sum(s.device_bytes(d) for s in shapes)
    # the groups that run together at each layer (layers.write_soft_rows: a layout per distinct set)
    layer_sets = list({s.layers for s in shapes})
    keys = {tuple(j for j, ls in enumerate(layer_sets) if layer in ls) for layer in range(limits.num_layers)}
    sets = [tuple(i for i, s in enumerate(shapes) if any(s.layers == layer_sets[j] for j in key))
            for key in keys if key]
    # sequences: each has at least one soft and one instruction row
    b = max(len(shapes), min(limits.max_seqs, T // 2))
    # the plan's row tensors (AdapterGroup): instruction rows and their segment ids, soft rows, offsets
    plan_rows = 8 * (2 * T + b + len(shapes))
    kept_total, peak = 0, 0
    for members in sets:
        group = [shapes[i] for i in members]
        g = len(group)
        r, m = max(s.r for s in group), max(s.m for s in group)
        p, q = max(s.p for s in group), max(s.q for s in group)
        flat = sum(s.r + s.m * s.r + s.p + s.q for s in group)
        # the two ends of N + S = T: one sequence per group, or as many soft rows as can be
        s_low = sum(s.m for s in group)
        s_high = max(s_low, min(T - g, b * m))
        kept_set, peak_set = 0, 0
        for s_rows in (s_low, s_high):
            n_rows = max(T - s_rows, g)
            kept, building = _layout_bytes(n_rows, s_rows, g, r, m, p, q, d)
            kept_set = max(kept_set, kept)
            peak_set = max(peak_set, building, _call_bytes(n_rows, s_rows, b, g, r, m, p, q, d, e, flat))
        kept_total += kept_set
        peak = max(peak, peak_set)
    return weights + plan_rows + kept_total + peak


def reference_shape(limits: StepLimits) -> AdapterShape:
    """The adapter the default reservation is sized for: bottleneck 64, up to 16 soft
    tokens, rational activation, a generator in every layer."""
    return AdapterShape(frozenset(range(limits.num_layers)), REFERENCE_BOTTLENECK,
                        min(REFERENCE_SOFT_TOKENS, limits.max_soft_tokens), REFERENCE_NUMERATOR,
                        REFERENCE_DENOMINATOR)


@dataclass(frozen=True)
class Reservation:
    total: int  # bytes taken from the KV cache
    explicit: bool  # max_device_adapter_bytes was given
    limits: StepLimits
    reference_weights: int  # the weights of 2 x max_adapters reference adapters
    reference_workspace: int  # their layouts and temporaries at max_num_batched_tokens rows

    def describe(self) -> str:
        """Where the figure comes from, for logs and messages."""
        gib = 1 << 30
        if self.explicit:
            return "max_device_adapter_bytes"
        return (f"default: weights of {REFERENCE_STEP_FACTOR} x max_adapters adapters of bottleneck "
                f"{REFERENCE_BOTTLENECK} on every layer "
                f"{self.reference_weights / gib:.3f} GiB, generator working memory of a step with them at "
                f"max_num_batched_tokens={self.limits.max_tokens} rows {self.reference_workspace / gib:.3f} GiB")


def reservation(vllm_config: VllmConfig, cfg: IAPTEngineConfig) -> Reservation:
    """The device bytes IAPT reserves per worker: ``max_device_adapter_bytes`` if
    set, else :func:`step_bytes` of a step with ``2 x max_adapters`` adapters of
    :func:`reference_shape` (which also holds ``max_adapters`` of them resident while a
    step of as many new ones runs)."""
    limits = StepLimits.of(vllm_config)
    shapes = [reference_shape(limits)] * (REFERENCE_STEP_FACTOR * cfg.max_adapters)
    weights = sum(s.device_bytes(limits.hidden_size) for s in shapes)
    default = step_bytes(shapes, limits)
    explicit = cfg.max_device_adapter_bytes is not None
    total = cfg.max_device_adapter_bytes if explicit else default
    return Reservation(total, explicit, limits, weights, default - weights)


def total_bytes(shapes: Iterable[AdapterShape], idle: Iterable[AdapterShape], limits: StepLimits) -> int:
    """Device bytes with a step of ``shapes`` running and the adapters ``idle``
    resident but unused by it."""
    return step_bytes(list(shapes), limits) + sum(s.device_bytes(limits.hidden_size) for s in idle)
