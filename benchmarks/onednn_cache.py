"""What bounding oneDNN's primitive cache costs in throughput and saves in memory (CPU).

vLLM's CPU linear layers run oneDNN GEMMs, and oneDNN keeps one primitive per
distinct shape in a process-wide cache (1,024 entries unless
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` says otherwise). Under traffic of varied
lengths every new number of tokens in a step adds primitives, which is what grows
the worker's memory in the soak runs (docs/reliability.md, "Memory"). A smaller
cache bounds that memory but rebuilds primitives more often. This measures both.

One IAPT server per capacity on SmolLM2-135M-Instruct with its four committed
tenants, all servers up at once; then R rounds, alternating the servers, of the same
``vllm bench serve`` load: the four tenants round-robin, prompt and output lengths
drawn from a wide range (so that steps have many distinct shapes), concurrency 8.
Reported per capacity: output tok/s, TTFT and TPOT (median over rounds, with the
range), throughput as a ratio to the default cache, and the worker's RssAnon after
the warm-up and at the end.

    .venv/bin/python benchmarks/onednn_cache.py            # about 20 minutes on 2 cores
    .venv/bin/python benchmarks/onednn_cache.py --quick    # plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from vllm_iapt.models.smollm2 import get_model  # noqa: E402
from vllm_iapt.serving.process import ServerProcess, vllm_serve  # noqa: E402
from assets import versions  # noqa: E402
from serve_bench import Run, System, bench  # noqa: E402
from soak.servers import group_pids, proc_name, rss_kib  # noqa: E402

ADAPTERS = ROOT / "examples" / "smollm2" / "adapters"
DEFAULT = "default"  # no ONEDNN_PRIMITIVE_CACHE_CAPACITY in the environment (oneDNN's 1,024)
METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_itl_ms")


def worker_pid(server: ServerProcess) -> int | None:
    return next((pid for pid in group_pids(server.proc.pid) if proc_name(pid) == "Worker"), None)


def worker_anon_mib(server: ServerProcess) -> float | None:
    """RssAnon of the server's worker process (what the primitive cache grows)."""
    pid = worker_pid(server)
    rss = rss_kib(pid) if pid is not None else None
    return round(rss[1] / 1024, 1) if rss else None


def worker_capacity(server: ServerProcess) -> str | None:
    """ONEDNN_PRIMITIVE_CACHE_CAPACITY as the worker process sees it (None: unset)."""
    pid = worker_pid(server)
    if pid is None:
        raise RuntimeError(f"no worker process under the server {server.url}")
    # Read raw, skipping entries without "=": vLLM retitles its workers (setproctitle),
    # which leaves NUL runs in /proc/<pid>/environ where psutil's parser stops.
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    value = env.get(b"ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    return value.decode() if value is not None else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="plumbing: two capacities, one short round, eager")
    ap.add_argument("--capacities", nargs="*", default=None, help=f"values to compare ('{DEFAULT}' = unset)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    capacities = args.capacities or ([DEFAULT, "1"] if args.quick else [DEFAULT, "256", "64", "1"])
    rounds = 1 if args.quick else args.rounds
    run = Run(64, 32, 4, 4, 8, 0.5) if args.quick else Run(128, 64, 8, 4, 64, 0.9)
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    model_dir = get_model()
    tenants = sorted(p for p in ADAPTERS.iterdir() if (p / "adapter_config.json").exists())
    common = ["--dtype", "float32", "--max-model-len", "2048", "--seed", "0", "--served-model-name", str(model_dir),
              "--enable-iapt", "--iapt-modules", *[f"{p.name}={p}" for p in tenants],
              *(["--enforce-eager"] if args.quick else [])]  # quick: plumbing, start faster
    system = lambda cap: System(f"onednn-{cap}", [], [p.name for p in tenants])  # noqa: E731
    samples: dict[str, list[dict]] = {c: [] for c in capacities}
    memory: dict[str, dict] = {}
    with ExitStack() as stack:
        servers = {}
        for cap in tqdm(capacities, desc="starting servers"):
            env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
            if cap != DEFAULT:
                env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cap
            cmd = lambda port: vllm_serve(str(model_dir), *common, port=port)  # noqa: E731
            servers[cap] = stack.enter_context(ServerProcess(cmd, out / "logs" / f"onednn-{cap}.log", env))
        for cap in capacities:  # warm-up: compilation, first adapter loads; not measured
            bench(servers[cap], model_dir, system(cap), Run(run.prompt_len, 16, run.concurrency, 4, 16, run.range_ratio),
                  raw, args.seed + 1, name=f"onednn-{cap}-warmup.json")
            memory[cap] = {"after_warmup_mib": worker_anon_mib(servers[cap]), "worker_env": worker_capacity(servers[cap])}
        bar = tqdm(total=rounds * len(capacities), desc="benchmark runs (interleaved)")
        for rep in range(rounds):
            # Alternate the order so that no capacity always runs first in a round.
            for cap in capacities if rep % 2 == 0 else capacities[::-1]:
                bar.set_postfix(capacity=cap)
                # The same prompts for every capacity within a round, fresh ones across rounds.
                samples[cap].append(bench(servers[cap], model_dir, system(cap), run, raw, args.seed + 1000 * rep,
                                          name=f"onednn-{cap}-r{rep}.json"))
                bar.update()
        bar.close()
        for cap in capacities:
            memory[cap]["end_mib"] = worker_anon_mib(servers[cap])
    results = []
    for cap in capacities:
        xs = samples[cap]
        med = {k: statistics.median(x[k] for x in xs) for k in METRICS}
        rng = {f"{k}_range": [min(x[k] for x in xs), max(x[k] for x in xs)] for k in METRICS}
        results.append({"capacity": cap, **med, **rng, "rounds": len(xs), "completed": sum(x["completed"] for x in xs),
                        "worker_rss_anon": memory[cap]})
    base = next(r["output_throughput"] for r in results if r["capacity"] == capacities[0])
    for r in results:
        r["throughput_ratio_to_" + capacities[0]] = round(r["output_throughput"] / base, 3)
    meta = {"command": " ".join(sys.argv), "run": run.__dict__, "model": "SmolLM2-135M-Instruct (float32)",
            "tenants": [p.name for p in tenants], "cores": os.cpu_count(),
            "processor": platform.processor(), "load_average": os.getloadavg(), "versions": versions()}
    (out / "onednn_cache.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_markdown(results, meta, capacities[0], out / "onednn_cache.md")
    print((out / "onednn_cache.md").read_text())


def write_markdown(results: list[dict], meta: dict, ref: str, path: Path) -> None:
    run = meta["run"]
    lines = [
        "# oneDNN primitive cache: throughput and worker memory",
        "",
        f"`{meta['command']}`; {meta['model']}, IAPT tenants {', '.join(meta['tenants'])} round-robin; "
        f"prompts {run['prompt_len']} tokens and outputs {run['output_len']} tokens, each drawn within "
        f"±{run['range_ratio']:.0%}; concurrency {run['concurrency']}, {run['num_prompts']} requests per round; "
        f"all servers up at once, rounds alternating the servers; {meta['cores']} cores, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in meta['load_average'])}; vLLM {meta['versions']['vllm']}.",
        "",
        f"| ONEDNN_PRIMITIVE_CACHE_CAPACITY | output tok/s (median, range) | ratio to {ref} | TTFT p50 ms | TPOT p50 ms "
        "| ITL p99 ms | worker RssAnon after warm-up / end (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lo, hi = r["output_throughput_range"]
        m = r["worker_rss_anon"]
        lines.append(f"| {r['capacity']} | {r['output_throughput']:.1f} ({lo:.1f}-{hi:.1f}) | "
                     f"{r['throughput_ratio_to_' + ref]:.3f} | {r['median_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} | "
                     f"{r['p99_itl_ms']:.0f} | {m['after_warmup_mib']} / {m['end_mib']} |")
    lines += ["", f"`{DEFAULT}`: the variable unset (oneDNN's default of 1,024 primitives).", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
