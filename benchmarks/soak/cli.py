"""Arguments, the settings they make (:func:`settings_from`), and :func:`main`:
one run, from set-up to the report. `benchmarks/soak.py` calls :func:`main`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json

from . import BENCHMARKS, DEMO
from . import __doc__ as DESCRIPTION
from .report import build_report, plot, write_markdown
from .run import Run


@dataclasses.dataclass
class Settings:
    requests: int
    max_time: float
    concurrency: int
    restarts: int
    prompts: int
    chat_prompts: int
    max_tokens: int
    max_model_len: int
    kv_blocks: int
    kv_blocks_after_restart: int
    block_size: int
    runtime_adapters: int
    catalogue_rounds: int
    mutation_rounds: int
    churn_period: float
    abort_fraction: float
    min_margin: float
    warmup_fraction: float
    seed: int
    serve_args: list[str]
    control: bool = False  # base model only, on a server without IAPT, no faults


def settings_from(args) -> Settings:
    """The settings of a run: the arguments given, the defaults (``--quick``'s or the full run's) otherwise."""
    quick = args.quick
    return Settings(
        requests=args.requests or (500 if quick else 10_000),
        max_time=args.max_time or (150.0 if quick else 4 * 3600.0),
        concurrency=args.concurrency or (8 if quick else 12),
        restarts=(args.restarts if args.restarts is not None else (0 if quick else 1)),
        prompts=24 if quick else 48,
        chat_prompts=8 if quick else 16,
        max_tokens=16,
        max_model_len=256,
        kv_blocks=args.kv_blocks,
        kv_blocks_after_restart=args.kv_blocks_after_restart,
        block_size=32,
        runtime_adapters=3 if quick else 4,
        catalogue_rounds=1 if quick else 3,
        mutation_rounds=1 if quick else 2,
        churn_period=3.0 if quick else 4.0,
        abort_fraction=0.03,
        min_margin=args.min_margin,
        warmup_fraction=0.5 if quick else 0.2,
        seed=args.seed,
        serve_args=list(args.serve_arg or []),
        control=args.control,
    )


def main() -> int:
    """Parses the arguments, runs, writes ``soak.{json,md,png}``; 1 if ``--strict`` and a target was missed."""
    ap = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="up to 500 requests (150 s at most), each malformed load and file change once, no restart "
                    "(about 3-4 minutes)")
    ap.add_argument("--requests", type=int, help="requests to send (default 10000; --quick 500)")
    ap.add_argument("--max-time", type=float, help="stop sending after this many seconds")
    ap.add_argument("--concurrency", type=int, help="concurrent clients (default 12; --quick 8)")
    ap.add_argument("--restarts", type=int, help="planned server stops and restarts (default 1; --quick 0)")
    ap.add_argument("--kv-blocks", type=int, default=12, help="KV cache blocks of 32 tokens (small: forces preemption)")
    ap.add_argument("--kv-blocks-after-restart", type=int, default=192,
                    help="KV cache blocks after the first planned restart (large: prefix-cache hits are common)")
    ap.add_argument("--min-margin", type=float, default=0.005, help="drop prompts with a smaller top-2 log-prob gap")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--model", default=str(DEMO / "model"))
    ap.add_argument("--serve-arg", action="append", help="extra `vllm serve` argument (repeatable)")
    ap.add_argument("--work-dir", default=str(BENCHMARKS / "work" / "soak"), help="scratch adapters and cached references")
    ap.add_argument("--out", default=str(BENCHMARKS / "results"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--control-json", help="a --control run's soak.json, to compare the worker's memory with")
    ap.add_argument("--control", action="store_true",
                    help="control run: the base model only, served without IAPT (same engine settings), no faults")
    args = ap.parse_args()
    s = settings_from(args)
    run = Run(s, args)
    run.out.mkdir(parents=True, exist_ok=True)
    run.prepare()
    try:
        drained = asyncio.run(run.main())
    finally:
        if run.server is not None:
            run.server.stop()
    rep = build_report(run, drained, args)
    (run.out / "soak.json").write_text(json.dumps(rep, indent=1, default=str))
    write_markdown(rep, run.out / "soak.md")
    plot(run, run.out / "soak.png")
    print(json.dumps({"requests": rep["requests"], "targets": rep["targets"], "passed": rep["passed"]}, indent=1))
    return 0 if rep["passed"] or not args.strict else 1
