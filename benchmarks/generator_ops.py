"""Operations and wall time of one planned-step layer call of the soft-row op, by
number of adapter groups in the step: the per-group loop it replaced against the
batched call (`vllm_iapt.generator.generate_grouped`).

    .venv/bin/python benchmarks/generator_ops.py [--quick] [--out benchmarks/results]

A "layer call" is `write_soft_rows(plan, layer, hidden_states, residual)`, what
`torch.ops.vllm.iapt_write_soft_rows` runs at the top of a decoder layer in a step
with IAPT prefills. The plan is built as the model runner builds it (adapter groups
of 2 requests each, 16-48 instruction rows per request, base-model requests in
between, weights as the adapter manager keeps them). Counted with the torch
profiler on CPU:

* aten ops: every aten op the call dispatches, nested ones included;
* compute ops: the leaves of that tree that are not views or metadata, about the
  number of kernels the call would launch on a GPU.

"steady" is a layer call after the step's first one; "first" is the step's first
layer call, which also builds the step's layout (index tensors shared by the step's
layers). Wall time: median of repeated steady calls, and a whole step of
`--layers` layer calls averaged per layer (layout build included). Two workloads:
"same" (every adapter d=576, r=64, m=4, rational, like the SmolLM2 tenants) and
"mixed" (r in 16..64, m in 1..8, every activation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm

from vllm_iapt.engine.layers import write_soft_rows
from vllm_iapt.engine.plan import AdapterGroup, StepPlan
from vllm_iapt.generator import (
    RATIONAL_GELU_DENOMINATOR, RATIONAL_GELU_NUMERATOR, GeneratorWeights, generate_packed,
)

D = 576  # SmolLM2-135M's hidden size
SAME = [(64, 4, "rational")]
MIXED = [(64, 4, "rational"), (32, 2, "gelu"), (16, 8, "identity"), (48, 1, "silu"), (24, 3, "relu"),
         (64, 4, "rational")]
#: Ops that launch no kernel: views, metadata, tensor wrapping.
NO_KERNEL = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::transpose", "aten::t", "aten::unsqueeze",
             "aten::expand", "aten::select", "aten::slice", "aten::as_strided", "aten::split", "aten::split_with_sizes",
             "aten::narrow", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_strided",
             "aten::resize_", "aten::to", "aten::_reshape_alias", "aten::permute", "aten::contiguous",
             "aten::result_type", "aten::broadcast_tensors", "aten::expand_as", "aten::squeeze", "aten::empty_like"}


def per_group_loop(plan, layer: int, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> None:
    """The soft-row write before batching (vllm_iapt/engine/layers.py until issue 19 item 6)."""
    for group in plan.groups:
        weights = group.weights[layer]
        if weights is None:
            continue
        x = hidden_states.index_select(0, group.instruction_rows)
        if residual is not None:
            x = x + residual.index_select(0, group.instruction_rows)
        s = generate_packed(weights, x, group.cu_seqlens, group.segment_ids)
        hidden_states.index_copy_(0, group.soft_rows, s.flatten(0, 1).to(hidden_states.dtype))
        if residual is not None:
            residual.index_fill_(0, group.soft_rows, 0)


def adapter_weights(r: int, m: int, activation: str, g: torch.Generator) -> GeneratorWeights:
    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    w = GeneratorWeights(rnd(r, D), torch.zeros(r), rnd(m, r), rnd(D, r, scale=0.02), torch.zeros(D), activation,
                         *((torch.tensor(RATIONAL_GELU_NUMERATOR), torch.tensor(RATIONAL_GELU_DENOMINATOR))
                           if activation == "rational" else ()))
    return w.flattened("cpu")  # as the adapter manager keeps them


def make_plan(configs: list, num_groups: int, num_layers: int, seed: int) -> tuple[StepPlan, int]:
    g = torch.Generator().manual_seed(seed)
    weights = [[adapter_weights(*configs[i % len(configs)], g)] * num_layers for i in range(num_groups)]
    soft, instr, lengths = ([[] for _ in range(num_groups)] for _ in range(3))
    row = 0
    for k in range(2 * num_groups):  # two requests per adapter, adapters interleaved
        i = k % num_groups
        if k % 3 == 1:
            row += int(torch.randint(8, 40, (1,), generator=g))  # a base-model request
        m, n = weights[i][0].num_soft_tokens, int(torch.randint(16, 49, (1,), generator=g))
        soft[i].append(torch.arange(row, row + m))
        instr[i].append(torch.arange(row + m, row + m + n))
        lengths[i].append(n)
        row += m + n
    groups = [AdapterGroup(weights=weights[i], soft_rows=torch.cat(soft[i]), instruction_rows=torch.cat(instr[i]),
                           cu_seqlens=torch.tensor([0] + torch.tensor(lengths[i]).cumsum(0).tolist()),
                           segment_ids=torch.repeat_interleave(torch.arange(len(lengths[i])),
                                                               torch.tensor(lengths[i])))
              for i in range(num_groups)]
    return StepPlan(groups), row


def count_ops(write, plan, hidden, residual) -> dict:
    """Ops of the step's first layer call and of a later one, in one profiler session."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for label, layer in (("first", 0), ("steady", 1)):
            with record_function(label):
                write(plan, layer, hidden, residual)
    events = prof.events()
    out = {}
    for label in ("first", "steady"):
        ops = [e for e in events if e.name.startswith("aten::") and _under(e, label)]
        has_aten_child = {id(e.cpu_parent) for e in ops if e.cpu_parent is not None}
        out[f"aten_ops_{label}"] = len(ops)
        out[f"compute_ops_{label}"] = sum(1 for e in ops if id(e) not in has_aten_child and e.name not in NO_KERNEL)
    return out


def _under(event, label: str) -> bool:
    while event.cpu_parent is not None:
        event = event.cpu_parent
        if event.name == label:
            return True
    return False


@torch.inference_mode()
def measure(workload: str, num_groups: int, num_layers: int, reps: int) -> list[dict]:
    """Both implementations on the same plan, their timed calls interleaved (the
    machine is shared: both see the same load)."""
    impls = {"loop": per_group_loop, "batched": write_soft_rows}
    plan, num_rows = make_plan(SAME if workload == "same" else MIXED, num_groups, num_layers, seed=num_groups)
    hidden, residual = torch.randn(num_rows, D), torch.randn(num_rows, D)
    results = {name: {"workload": workload, "groups": num_groups, "impl": name,
                      "instruction_rows": sum(g.instruction_rows.numel() for g in plan.groups),
                      "soft_rows": sum(g.soft_rows.numel() for g in plan.groups),
                      **count_ops(write, StepPlan(list(plan.groups)), hidden, residual)}
               for name, write in impls.items()}
    layer_s, step_s = {name: [] for name in impls}, {name: [] for name in impls}
    for rep in range(reps + 1):
        for name, write in impls.items():
            fresh = StepPlan(list(plan.groups))  # a new step: the batched op builds its layout again
            t0 = time.perf_counter()
            for layer in range(num_layers):
                write(fresh, layer, hidden, residual)
            t1 = time.perf_counter()
            write(fresh, 0, hidden, residual)
            t2 = time.perf_counter()
            if rep:  # the first round warms up
                step_s[name].append((t1 - t0) / num_layers)
                layer_s[name].append(t2 - t1)
    for name, r in results.items():
        r["layer_ms"] = 1e3 * statistics.median(layer_s[name])
        r["step_ms_per_layer"] = 1e3 * statistics.median(step_s[name])
    return list(results.values())


def write_report(results: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "generator_ops.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    by = {(r["workload"], r["groups"], r["impl"]): r for r in results}
    lines = [
        "# Soft-row op: operations per layer call, by adapter groups in the step",
        "",
        (f"`{meta['command']}`; torch {meta['torch']}, CPU, {meta['threads']} threads, d={D}, two requests per "
        "adapter with 16-48 instruction rows each. *before*: one `generate_packed` per group (the old loop); "
        "*after*: one `generate_grouped` call. aten ops: every op the layer call dispatches (profiler, nested "
        "included); compute ops: leaves that are not views, about the kernels it would launch on a GPU. "
        "*first*: the step's first layer call, which also builds the step's layout. Times are medians on a "
        "shared 2-core machine: compare within a row."),
        "",
        ("| workload | groups | rows | aten ops before | aten ops after | compute ops before | compute ops after "
        "| compute ops after, first call | ms/layer before | ms/layer after | ms/layer in a step, before "
        "| ms/layer in a step, after |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = [
        "",
        "The batched call's counts do not depend on the number of groups (the mixed workload adds the "
        "activation and `where` ops of its extra activations, once). On CPU the batched call copies the "
        "step's adapter weights into tiles and pads rows, so its time is not lower there; the saving it is "
        "for is the per-group kernel launches on a GPU. Its temporaries are megabytes, which glibc malloc "
        "(no tcmalloc preloaded) serves with fresh pages on every call: rerun with "
        "`MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736` (or tcmalloc, which vLLM's CPU "
        f"platform preloads when bundled) to see the time without page faults. Allocator here: {meta['allocator']}.",
    ]
    for workload in meta["workloads"]:
        for n in meta["groups"]:
            b, a = by[(workload, n, "loop")], by[(workload, n, "batched")]
            lines.append(
                f"| {workload} | {n} | {a['instruction_rows']} | {b['aten_ops_steady']} | {a['aten_ops_steady']} "
                f"| {b['compute_ops_steady']} | {a['compute_ops_steady']} | {a['compute_ops_first']} "
                f"| {b['layer_ms']:.2f} | {a['layer_ms']:.2f} | {b['step_ms_per_layer']:.2f} "
                f"| {a['step_ms_per_layer']:.2f} |")
    (out / "generator_ops.md").write_text("\n".join(lines + notes) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--layers", type=int, default=8, help="layer calls per measured step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    groups, workloads = [1, 8, 32], ["same", "mixed"]
    reps = 3 if args.quick else 15
    grid = [(w, n) for w in workloads for n in groups]
    results = [r for w, n in tqdm(grid, desc="soft-row op") for r in measure(w, n, args.layers, reps)]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "allocator": {k: v for k, v in os.environ.items() if k == "LD_PRELOAD" or k.startswith("MALLOC_")}
            or "glibc malloc, default settings",
            "d": D, "groups": groups, "workloads": workloads, "layers_per_step": args.layers, "reps": reps,
            "command": "benchmarks/generator_ops.py" + (" --quick" if args.quick else "")
            + (f" --threads {args.threads}" if args.threads != 1 else "")}
    write_report(results, Path(args.out), meta)
    print((Path(args.out) / "generator_ops.md").read_text())


if __name__ == "__main__":
    main()
