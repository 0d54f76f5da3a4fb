"""One soak run: the state its parts share (:class:`Run`), its set-up, and the
event loop that runs traffic, churn and faults against the server together."""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from tqdm import tqdm

from vllm_iapt.serving.process import ServerProcess

from . import BASE, DEMO
from .adapters import build_catalogue, write_adapter
from .checker import Checker
from .faults import Faults
from .servers import Sampler, Servers
from .workload import Workload, build_prompts

if TYPE_CHECKING:
    from .cli import Settings


class Run(Workload, Checker, Faults, Servers):
    """The state of one run, shared by its parts: traffic (:class:`~.workload.Workload`),
    the checker (:class:`~.checker.Checker`), faults (:class:`~.faults.Faults`) and the
    server (:class:`~.servers.Servers`). :func:`~.report.build_report` reads it."""

    def __init__(self, s: Settings, args) -> None:
        self.s, self.args = s, args
        self.out = Path(args.out)
        self.work = Path(args.work_dir)
        self.rng = random.Random(s.seed)
        self.t0 = time.monotonic()
        self.server: ServerProcess | None = None
        self.incarnation = 0
        self.planned_stops = 0
        self.done = 0
        self.serving = asyncio.Event()
        self.restarting = False
        self.results = Counter()
        self.status_codes = Counter()
        self.unexpected: list[dict] = []  # first few problems, for the report
        self.latencies: list[tuple[float, float, str]] = []  # (t, seconds, kind)
        self.events: list[dict] = []  # faults and restarts, with time
        self.faults: dict[str, Counter] = defaultdict(Counter)
        self.catalogue_results: dict[str, list] = defaultdict(list)
        self.mutation_results: list[dict] = []
        self.deaths: list[dict] = []
        self.metrics_by_incarnation: list[dict] = []
        self.loaded_runtime: set[str] = set()
        self.runtime_lock = asyncio.Lock()
        self.mutation_models: set[str] = set()
        self.prefix_cached_tokens = 0
        self.incarnation_done: list[tuple[int, int]] = []  # (incarnation, requests started before it)
        self.canary: dict = {}
        self.gate: float | None = 0.0  # traffic may not run ahead of the next fault by more than 5% of the run

    # -- set-up ---------------------------------------------------------------
    def prepare(self) -> None:
        """Adapters on disk (run-time, resolver-found, file-change sources, the outside
        one, the malformed catalogue) and the prompt pool."""
        s = self.s
        from transformers import AutoTokenizer

        self.model_dir = Path(self.args.model).resolve()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.work.exists():
            shutil.rmtree(self.work / "adapters", ignore_errors=True)
        self.adir = (self.work / "adapters").resolve()
        self.outside = (self.work / "outside-adapter").resolve()
        self.adir.mkdir(parents=True, exist_ok=True)
        write_adapter(self.outside, 999)
        self.static = {name: str((DEMO / "adapters" / name).resolve()) for name in ("sort", "reverse", "upper", "count")}
        # Run-time adapters: the directory name differs from the served name, so the
        # resolver cannot bring an unloaded one back and requests for it get a 404.
        self.runtime = {f"rt{i}": write_adapter(self.adir / "pool" / f"dir-rt{i}", 100 + i, num_soft_tokens=(2, 4, 8, 3)[i % 4])
                        for i in range(s.runtime_adapters)}
        self.resolved = {"found0": write_adapter(self.adir / "found0", 200, num_soft_tokens=5)}
        self.mut_a = write_adapter(self.work / "mut-src" / "a", 300)
        self.mut_b = write_adapter(self.work / "mut-src" / "b", 301)  # same shapes and size as a
        self.catalogue = build_catalogue(self.adir, self.outside, write_adapter(self.adir / "good", 400))
        self.cmpl, self.chat = build_prompts(s, self.tokenizer)
        self.paths: dict[str, str | None] = {BASE: None, **self.static, **{k: str(v) for k, v in self.runtime.items()},
                                             **{k: str(v) for k, v in self.resolved.items()},
                                             "mut:a": str(self.mut_a), "mut:b": str(self.mut_b),
                                             "outside": str(self.outside)}

    # -- helpers ----------------------------------------------------------------
    def event(self, kind: str, **kw) -> None:
        self.events.append({"t": round(time.monotonic() - self.t0, 2), "kind": kind, "done": self.done, **kw})

    def problem(self, **kw) -> None:
        if len(self.unexpected) < 50:
            self.unexpected.append({"t": round(time.monotonic() - self.t0, 2), **kw})

    async def main(self) -> dict:
        """Starts the server (the references are computed meanwhile), loads the
        run-time adapters, sends the plan from ``concurrency`` clients while churn
        and faults run, and returns the metrics of the server once drained."""
        s = self.s
        self.sampler = Sampler(self)
        self.server = self.new_server()
        start = asyncio.create_task(asyncio.to_thread(self.server.start))
        await asyncio.to_thread(self.references)  # overlaps the server's start-up
        await start
        self.t0 = time.monotonic()
        self.sampler.sample(force=True)
        self.sampler.start()
        self.event("server-ready", incarnation=self.incarnation)
        self.serving.set()
        jobs = self.plan()
        queue: asyncio.Queue = asyncio.Queue()
        for j in jobs:
            queue.put_nowait(j)
        limits = httpx.Limits(max_connections=s.concurrency + 8, max_keepalive_connections=s.concurrency + 8)
        async with httpx.AsyncClient(limits=limits) as http:
            for name in ([] if s.control else sorted(self.runtime)):
                status, text = await self.post(http, "/v1/load_lora_adapter",
                                               {"lora_name": name, "lora_path": str(self.runtime[name].relative_to(self.adir))})
                if status == 200:
                    self.loaded_runtime.add(name)
                else:
                    self.problem(what="initial load failed", model=name, status=status, detail=text)
            if not s.control:
                await self.run_canary(http)
            stop = asyncio.Event()
            deadline = time.monotonic() + s.max_time
            bar = tqdm(total=len(jobs), desc="soak requests", unit="req", mininterval=1.0)
            side = [] if s.control else [asyncio.create_task(self.churn(http, stop)),
                                         asyncio.create_task(self.faults_task(http, stop))]
            if s.control:
                self.gate = None
            workers = [asyncio.create_task(self.worker(http, queue, bar, deadline)) for _ in range(s.concurrency)]
            await asyncio.gather(*workers)
            stop.set()
            await asyncio.gather(*side)
            bar.close()
            if not self.alive():
                await self.check_alive("dead at the end of traffic")
            drained = await self.drain_metrics()
            self.sampler.sample(force=True)
            self.metrics_by_incarnation.append({"incarnation": self.incarnation, **drained})
        self.sampler.halt.set()
        self.sampler.join()
        self.duration = time.monotonic() - self.t0
        self.server.stop()
        return drained
