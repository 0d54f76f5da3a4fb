"""What a cold adapter costs the tenants already decoding: read ahead vs read in the step.

A request whose adapter the engine has never seen needs the adapter's snapshot read,
checked and packed on every worker (24 ms for an r=64 float32 adapter of SmolLM2 on
this machine, docs/engine.md). With read-ahead (``read_ahead``, on by default on a GPU,
``vllm_iapt/engine/admission.py``) the scheduler announces the adapter one step before
it starts the request, and each worker reads it in a background thread while that
step runs; without it, every step that starts a new adapter first waits for its read.

One offline engine (in process), both ways in one run, each on its own fresh
adapters: ``--warm`` requests of one adapter decode long outputs while one request of a
new adapter arrives each step (``--cold`` of them). Reported for each way: the time
of the steps that start a cold adapter and of the other steps (p50/p99), the warm
requests' output tokens per second while cold adapters arrive, the cold requests'
TTFT, and how many adapters the workers read ahead or inside a step. "Read in the
step" is the same engine with ``read_ahead`` switched off in its scheduler (the
default on a CPU device; on by default on a GPU).

    .venv/bin/python benchmarks/cold_adapters.py            # SmolLM2-135M, r=64 float32 (about 2 minutes)
    .venv/bin/python benchmarks/cold_adapters.py --quick    # plumbing, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from assets import SIZES, build_model, iapt_adapters, versions  # noqa: E402

WAYS = ("read ahead", "read in the step")


def pct(xs: list[float], q: float) -> float | None:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else None)


@contextmanager
def way(llm, name: str):
    """Read-ahead on or off in the running engine's scheduler (the ``read_ahead``
    option, read by the scheduler at every step)."""
    admission = llm.llm_engine.engine_core.engine_core.scheduler.iapt
    admission.read_ahead = name == "read ahead"
    try:
        yield
    finally:
        admission.read_ahead = True


def measure(llm, warm: tuple, cold: list[tuple], args, rng_seed: int) -> dict:
    """Warm requests decode; one cold request arrives per step. Per-step timings."""
    import random

    from vllm import SamplingParams

    from vllm_iapt import IAPTRequest

    engine = llm.llm_engine
    manager = engine.model_executor.driver_worker.worker.model_runner.iapt.manager
    rng = random.Random(rng_seed)
    vocab = llm.get_tokenizer().vocab_size

    def prompt() -> dict:
        return {"type": "token", "prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(args.prompt_len)]}

    long = SamplingParams(temperature=0.0, max_tokens=args.warm_tokens, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(args.warm):
        engine.add_request(f"warm-{rng_seed}-{i}", prompt(), long, lora_request=IAPTRequest(*warm))
    while not any(o.request_id.startswith("warm-") and o.outputs[0].token_ids for o in engine.step()):
        pass
    for _ in range(2):  # every warm request decoding
        engine.step()
    counts = manager.num_read_ahead, manager.num_read_in_step
    added: dict[str, float] = {}
    ttft: list[float] = []
    started_cold, other, warm_tokens = [], [], 0
    t_start = time.perf_counter()
    pending = list(cold)
    while pending or len(ttft) < len(cold):
        if pending:
            name, int_id, path = pending.pop(0)
            rid = f"cold-{name}"
            engine.add_request(rid, prompt(), short, lora_request=IAPTRequest(name, int_id, path))
            added[rid] = time.perf_counter()
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        firsts = [o for o in outs if o.request_id in added and len(o.outputs[0].token_ids) == 1]
        for o in firsts:
            ttft.append(time.perf_counter() - added.pop(o.request_id))
        (started_cold if firsts else other).append(dt)
        warm_tokens += sum(1 for o in outs if o.request_id.startswith("warm-") and not o.finished)
    elapsed = time.perf_counter() - t_start
    for rid in list(engine.output_processor.request_states):
        engine.abort_request([rid])
    while engine.has_unfinished_requests():
        engine.step()
    ms = lambda xs, q: None if not xs else round(1000 * pct(xs, q), 2)  # noqa: E731
    return {"cold_adapters": len(cold), "warm_requests": args.warm,
            "steps_starting_cold": len(started_cold), "other_steps": len(other),
            "step_ms_starting_cold_p50": ms(started_cold, 50), "step_ms_starting_cold_p99": ms(started_cold, 99),
            "step_ms_other_p50": ms(other, 50), "step_ms_other_p99": ms(other, 99),
            "warm_tok_s": round(warm_tokens / elapsed, 1),
            "cold_ttft_ms_p50": ms(ttft, 50), "cold_ttft_ms_p99": ms(ttft, 99),
            "read_ahead": manager.num_read_ahead - counts[0], "read_in_step": manager.num_read_in_step - counts[1]}


def markdown(results: dict[str, dict], meta: dict) -> str:
    rows = [("steps that start a cold adapter, p50 / p99 (ms)", "step_ms_starting_cold_p50", "step_ms_starting_cold_p99"),
            ("other steps, p50 / p99 (ms)", "step_ms_other_p50", "step_ms_other_p99"),
            ("cold request TTFT, p50 / p99 (ms)", "cold_ttft_ms_p50", "cold_ttft_ms_p99")]
    lines = [f"# What a cold adapter costs the tenants already decoding ({meta['model']})", "",
             f"{meta['warm']} requests of one adapter decode while one request of a new adapter (r={meta['bottleneck']}, "
             f"m=4, float32, {meta['adapter_mib']:.1f} MiB) arrives each step, {meta['cold']} of them; both ways in one "
             f"run of one offline engine, each way on its own fresh adapters; rounds: {meta['rounds']} (best round "
             "by warm tok/s shown). Command: `" + meta["command"] + "`.", "",
             "| | " + " | ".join(WAYS) + " |", "|---|" + "---|" * len(WAYS)]
    for label, a, b in rows:
        lines.append(f"| {label} | " + " | ".join(f"{results[w][a]} / {results[w][b]}" for w in WAYS) + " |")
    lines.append("| warm requests' output tok/s | " + " | ".join(str(results[w]["warm_tok_s"]) for w in WAYS) + " |")
    lines.append("| adapters read ahead / inside a step | " +
                 " | ".join(f"{results[w]['read_ahead']} / {results[w]['read_in_step']}" for w in WAYS) + " |")
    ahead, inside = results[WAYS[0]], results[WAYS[1]]
    if ahead["step_ms_starting_cold_p50"] and inside["step_ms_starting_cold_p50"]:
        lines += ["", f"Steps that start a cold adapter: {ahead['step_ms_starting_cold_p50'] / inside['step_ms_starting_cold_p50']:.2f}x "
                  f"the time with read-ahead (p50); warm tok/s {ahead['warm_tok_s'] / inside['warm_tok_s']:.2f}x."]
    lines += ["", f"Machine: {meta['machine']}; versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few adapters (plumbing)")
    ap.add_argument("--warm", type=int, default=8, help="requests of a warm adapter decoding meanwhile")
    ap.add_argument("--cold", type=int, default=24, help="new adapters arriving, one per step")
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both ways (fresh adapters each)")
    ap.add_argument("--work-dir", type=Path, default=HERE / "work" / "cold_adapters")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if args.quick:
        args.warm, args.cold, args.rounds, args.bottleneck = 2, 3, 1, 8
    size = SIZES["tiny" if args.quick else "smollm2"]
    args.warm_tokens = args.cold * 3 + 64
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: the announcements can be switched off
    from vllm import LLM

    model = build_model(args.work_dir / "model", size)
    n = 1 + 2 * args.rounds * args.cold
    paths = iapt_adapters(args.work_dir / f"adapters-r{args.bottleneck}", size, n, args.bottleneck)
    adapters = [(p.name, i + 1, str(p)) for i, p in enumerate(paths)]
    llm = LLM(model=str(model), dtype="float32", max_model_len=512, seed=0, enforce_eager=True,
              additional_config={"iapt": {"max_adapters": 4, "read_ahead": True}})
    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    fresh = iter(adapters[1:])
    with tqdm(total=args.rounds * len(WAYS), desc="cold adapters", unit="run") as bar:
        for r in range(args.rounds):
            for w in WAYS:
                with way(llm, w):
                    runs[w].append(measure(llm, adapters[0], [next(fresh) for _ in range(args.cold)], args, 100 * r))
                bar.update()
    results = {w: max(runs[w], key=lambda x: x["warm_tok_s"]) for w in WAYS}
    meta = {"model": "tiny" if args.quick else "SmolLM2-135M-Instruct", "warm": args.warm, "cold": args.cold,
            "bottleneck": args.bottleneck, "rounds": args.rounds,
            "adapter_mib": sum(f.stat().st_size for f in paths[0].iterdir()) / (1 << 20),
            "command": "python benchmarks/cold_adapters.py" + (" --quick" if args.quick else ""),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "versions": versions()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cold_adapters.json").write_text(json.dumps({"meta": meta, "results": results, "runs": runs},
                                                            indent=2) + "\n")
    (args.out / "cold_adapters.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
