"""IAPT vs multi-LoRA vs the base model, served by vLLM and driven by `vllm bench serve`.

    .venv/bin/python benchmarks/serve_bench.py            # default suite, ~100M model (about 40 minutes on 2 cores)
    .venv/bin/python benchmarks/serve_bench.py --quick    # a few minutes, small model
    .venv/bin/python benchmarks/serve_bench.py --size tiny --quick --out /tmp/x   # plumbing only (the test suite)

One run starts each server in turn on the same base model and engine settings:
the base model (vLLM defaults: compiled, chunked prefill), the base model with the
settings LoRA forces on CPU (eager) and with the settings IAPT forces (no chunked
prefill; IAPT keeps compilation), IAPT with 64 adapters loaded, and multi-LoRA with
64 adapters of a parameter-matched rank and of ranks 8 and 16. Every server gets the same random
prompts (fixed seed) and output lengths; adapter requests are spread round-robin
over the first N adapters. Results: JSON, a Markdown table of absolute numbers and
ratios to the base model measured in the same run, and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vllm_iapt.serving.process import ServerProcess, vllm_serve  # noqa: E402
from assets import SIZES, build_model, versions, iapt_adapters, iapt_parameters, lora_adapters, lora_parameters, parameter_matched_rank  # noqa: E402

METRICS = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
           "p99_tpot_ms", "median_itl_ms", "p99_itl_ms")


@dataclass(frozen=True)
class Run:
    prompt_len: int
    output_len: int
    concurrency: int
    num_adapters: int  # 0 = base-model requests
    num_prompts: int
    range_ratio: float = 0.0  # lengths drawn from [len * (1 - r), len * (1 + r)]; 0 = every request alike


@dataclass
class System:
    name: str
    serve_args: list[str]
    adapter_names: list[str] = field(default_factory=list)
    note: str = ""


def plan_runs(quick: bool, targets: bool = False) -> list[Run]:
    if quick:
        return [Run(64, 32, 4, n, 8) for n in (1, 4)]
    if targets:  # the compiled-engine targets: N = 16 and 64 at prompt 128, TTFT at prompt 1024
        return [Run(128, 128, 8, n, 32) for n in (16, 64)] + [Run(1024, 128, 8, 16, 16)]
    runs = [Run(128, 128, 8, n, 32) for n in (1, 4, 16, 64)]
    runs += [Run(128, 128, c, 16, 32) for c in (2, 16)]  # concurrency sweep
    runs += [Run(1024, 128, 8, 16, 16)]
    return runs


def systems(model_dir: Path, work: Path, size, quick: bool, slots: int, bottleneck: int) -> list[System]:
    n_max = 4 if quick else 64
    iapt = iapt_adapters(work / "adapters", size, n_max, bottleneck)
    pm = parameter_matched_rank(size, bottleneck)
    ranks = [8] if quick else sorted({pm, 8, 16})
    out = [
        System("base", [], note="vLLM defaults (compiled, chunked prefill)"),
        System("base-eager", ["--enforce-eager"], note="what LoRA forces on CPU: eager"),
        System("base-nochunk", ["--no-enable-chunked-prefill"],
               note="what IAPT forces: no chunked prefill (compiled, as IAPT)"),
        System("iapt", ["--enable-iapt", "--max-iapt-adapters", str(slots),
                        "--max-cpu-iapt-adapters", str(max(n_max, slots)), "--iapt-modules",
                        *[f"{p.name}={p}" for p in iapt]], [p.name for p in iapt],
               note=f"IAPT m=4 r={bottleneck}, {iapt_parameters(size, bottleneck):,} params/adapter"),
    ]
    for r in ranks:
        loras = lora_adapters(work / "adapters", size, n_max, r)
        out.append(System(f"lora-r{r}", ["--enable-lora", "--max-loras", str(slots), "--max-lora-rank", str(r),
                                         "--max-cpu-loras", str(max(n_max, slots)), "--lora-modules", *[f"{p.name}={p}" for p in loras]],
                          [p.name for p in loras],
                          note=f"rank {r}{' (parameter-matched)' if r == pm else ''}, "
                          f"{lora_parameters(size, r):,} params/adapter"))
    return out


class QueueSampler(threading.Thread):
    """Polls /metrics for running/waiting request counts while a run goes on."""

    def __init__(self, server: ServerProcess, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server, self.period = server, period
        self.samples: list[tuple[float, float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.wait(self.period):
            try:
                text = self.server.metrics()
            except OSError:
                continue
            vals = {k: sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                           if s.name == f"vllm:num_requests_{k}") for k in ("running", "waiting")}
            self.samples.append((time.monotonic() - t0, vals["running"], vals["waiting"]))

    def stop(self) -> list[tuple[float, float, float]]:
        self._halt.set()
        self.join()
        return self.samples


def run_seed(base_seed: int, run: Run) -> int:
    """Each run gets its own prompts (so no run hits the prefix cache filled by an
    earlier one on the same server), and every system gets the same prompts for
    the same run."""
    return base_seed + 7919 * run.prompt_len + 104729 * run.concurrency + 1299709 * run.num_adapters


def vllm_bench_serve(argv: list[str]) -> None:
    """Runs ``vllm bench serve <argv>``: vLLM's own benchmark client, called in this
    process (its parser and ``main``) instead of a new ``vllm`` process per run,
    which would spend about 20 s importing vLLM each time. Raises on failure."""
    import gc

    from vllm.benchmarks.serve import add_cli_args, main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    try:
        bench_main(parser.parse_args(argv))
    finally:
        gc.unfreeze()  # vLLM's client freezes the GC heap for its run; later runs would keep it all


def bench(server: ServerProcess, model_dir: Path, system: System, run: Run, out_dir: Path, seed: int,
          name: str | None = None) -> dict:
    name = name or f"{system.name}-p{run.prompt_len}-c{run.concurrency}-n{run.num_adapters}.json"
    argv = ["--backend", "vllm",
            "--base-url", server.url, "--model", str(model_dir), "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(run.prompt_len),
            "--random-output-len", str(run.output_len), "--random-range-ratio", str(run.range_ratio), "--ignore-eos",
            "--num-prompts", str(run.num_prompts), "--max-concurrency", str(run.concurrency),
            "--seed", str(run_seed(seed, run)),
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    if run.num_adapters:
        argv += ["--lora-modules", *system.adapter_names[: run.num_adapters], "--lora-assignment", "round-robin"]
    sampler = QueueSampler(server)
    sampler.start()
    try:
        vllm_bench_serve(argv)
    except (Exception, SystemExit) as e:  # argparse exits with SystemExit
        raise RuntimeError(f"vllm bench serve failed for {name}: {type(e).__name__}: {e}") from e
    finally:
        timeline = sampler.stop()
    data = json.loads((out_dir / name).read_text())
    return {"system": system.name, **asdict(run), **{k: data.get(k) for k in METRICS},
            "completed": data.get("completed"), "command": "vllm bench serve " + " ".join(argv), "queue": timeline,
            "max_running": max((s[1] for s in timeline), default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="plumbing: small grid, few prompts, eager servers")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default: 'default'; --quick: 'tiny')")
    ap.add_argument("--work-dir", default=str(HERE / "work"), help="model and adapters (rebuilt only if missing)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where results go")
    ap.add_argument("--slots", type=int, default=8, help="device adapter slots: --max-loras and --max-iapt-adapters")
    ap.add_argument("--bottleneck", type=int, default=64, help="IAPT bottleneck r")
    ap.add_argument("--systems", nargs="*", help="only these systems (names as in the results)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", action="store_true", help="only the runs the compiled-engine targets are about")
    ap.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="start every server at once and run each measurement R times, alternating systems "
                         "(base, iapt, ..., base, iapt, ...), reporting the median: ratios that hold on a busy machine")
    args = ap.parse_args()
    size_name = args.size or ("tiny" if args.quick else "default")
    size = SIZES[size_name]
    work, out = Path(args.work_dir) / size_name, Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(work / "model", size)
    runs = plan_runs(args.quick, args.targets)
    chosen = [s for s in systems(model_dir, work, size, args.quick, args.slots, args.bottleneck)
              if not args.systems or s.name in args.systems]
    common = ["--dtype", "float32", "--max-model-len", "2048", "--max-num-batched-tokens", "2048", "--seed", "0",
              "--served-model-name", str(model_dir)]
    if args.quick:  # plumbing: every server eager, so none spends its start-up compiling
        common.append("--enforce-eager")
    base_runs = list(dict.fromkeys(Run(r.prompt_len, r.output_len, r.concurrency, 0, r.num_prompts) for r in runs))
    if args.interleave:
        results = run_interleaved(chosen, runs, base_runs, model_dir, common, raw, out, args.seed, args.interleave)
    else:
        results = run_sequential(chosen, runs, base_runs, model_dir, common, raw, out, args.seed)
    meta = {"interleaved_repeats": args.interleave, "model": size_name, "parameters": size.num_parameters(), "machine": platform.machine(),
            "processor": platform.processor(), "python": platform.python_version(), "cores": _cores(),
            "versions": versions(), "command": " ".join(sys.argv), "slots": args.slots, "bottleneck": args.bottleneck}
    from report import write_report

    write_report(results, meta, out)


def run_sequential(chosen: list[System], runs: list[Run], base_runs: list[Run], model_dir: Path, common: list[str],
                   raw: Path, out: Path, seed: int) -> list[dict]:
    """One server at a time, each with its own warm-up."""
    jobs = [(s, r) for s in chosen for r in (runs if s.adapter_names else base_runs)]
    results = []
    bar = tqdm(total=len(jobs), desc="benchmark runs")
    for system in chosen:
        mine = [r for s, r in jobs if s is system]
        bar.set_postfix(system=system.name, refresh=True)
        env = {"VLLM_CPU_KVCACHE_SPACE": "4"}
        cmd = lambda port: vllm_serve(str(model_dir), *common, *system.serve_args, port=port)  # noqa: E731
        with ServerProcess(cmd, out / "logs" / f"{system.name}.log", env) as srv:
            # Warm-up (compilation, allocator, first adapter loads), not measured.
            warm = Run(mine[0].prompt_len, 16, mine[0].concurrency, mine[0].num_adapters, mine[0].concurrency)
            bench(srv, model_dir, system, warm, raw, seed + 1, name=f"{system.name}-warmup.json")
            for run in mine:
                bar.set_postfix(system=system.name, run=f"p{run.prompt_len} c{run.concurrency} n{run.num_adapters}")
                res = bench(srv, model_dir, system, run, raw, seed)
                res["note"] = system.note
                res["serve_command"] = " ".join(srv.cmd)
                results.append(res)
                bar.update()
    bar.close()
    return results


def run_interleaved(chosen: list[System], runs: list[Run], base_runs: list[Run], model_dir: Path, common: list[str],
                    raw: Path, out: Path, seed: int, repeats: int) -> list[dict]:
    """Every server up at once (small KV caches), each measurement taken `repeats`
    times in turn on every system, median kept: load from elsewhere on the machine
    then hits all systems alike instead of whichever ran during it."""
    import statistics
    from contextlib import ExitStack

    with ExitStack() as stack:
        servers = {}
        for system in tqdm(chosen, desc="starting servers"):
            cmd = lambda port, system=system: vllm_serve(str(model_dir), *common, *system.serve_args, port=port)  # noqa: E731
            servers[system.name] = stack.enter_context(
                ServerProcess(cmd, out / "logs" / f"{system.name}.log", {"VLLM_CPU_KVCACHE_SPACE": "1"}))
        # Base-model runs next to the adapter runs with the same prompt length and concurrency,
        # so that every ratio compares measurements taken minutes apart, not a round apart.
        ordered = sorted(dict.fromkeys(base_runs + runs), key=lambda r: (r.prompt_len, r.concurrency, r.num_adapters))
        plan = [(system, run) for run in ordered for system in chosen
                if (run.num_adapters > 0) == bool(system.adapter_names)]
        for system in chosen:  # warm-up: compilation, allocator, first adapter loads; not measured
            first = next(r for s, r in plan if s is system)
            warm = Run(first.prompt_len, 16, first.concurrency, first.num_adapters, first.concurrency)
            bench(servers[system.name], model_dir, system, warm, raw, seed + 1, name=f"{system.name}-warmup.json")
        samples: dict[tuple[str, Run], list[dict]] = {}
        bar = tqdm(total=len(plan) * repeats, desc="benchmark runs (interleaved)")
        for rep in range(repeats):
            for system, run in plan:
                bar.set_postfix(system=system.name, run=f"p{run.prompt_len} c{run.concurrency} n{run.num_adapters}")
                name = f"{system.name}-p{run.prompt_len}-c{run.concurrency}-n{run.num_adapters}-r{rep}.json"
                # Same prompts for every system within a repetition, fresh ones across repetitions.
                res = bench(servers[system.name], model_dir, system, run, raw, seed + 1000 * rep, name=name)
                samples.setdefault((system.name, run), []).append(res)
                bar.update()
        bar.close()
    results = []
    for (name, run), xs in sorted(samples.items(), key=lambda kv: [s.name for s in chosen].index(kv[0][0])):
        system = next(s for s in chosen if s.name == name)
        med = {k: statistics.median(x[k] for x in xs) for k in METRICS}
        spread = {f"{k}_range": [min(x[k] for x in xs), max(x[k] for x in xs)] for k in ("output_throughput", "median_ttft_ms")}
        results.append({**xs[0], **med, **spread, "repeats": len(xs), "note": system.note,
                        "serve_command": " ".join(servers[name].cmd), "max_running": max(x["max_running"] for x in xs)})
    return results


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
