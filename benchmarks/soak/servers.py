"""The server under test: its command, start, stop and restart, telling a death
from a planned stop, its ``/metrics``, and the memory of each of its processes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import TYPE_CHECKING

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from vllm_iapt.serving.process import ServerProcess, vllm_serve

from . import BASE

if TYPE_CHECKING:
    from .run import Run


def group_pids(pgid: int) -> list[int]:
    """Every process of the process group ``pgid`` (a server runs in its own session)."""
    out = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                out.append(pid)
        except OSError:  # gone
            continue
    return out


def rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in KiB. RssAnon (heap, tensors) is what a leak grows;
    VmRSS also counts file-backed pages (libraries, mapped weights), which the
    kernel drops and reloads under memory pressure from other processes.
    psutil's ``rss`` is VmRSS and its ``shared`` is RssFile + RssShmem (Linux).
    None for a process that is gone or has no memory (a zombie)."""
    try:
        mem = psutil.Process(pid).memory_info()
    except psutil.Error:
        return None
    return (mem.rss // 1024, (mem.rss - mem.shared) // 1024) if mem.rss else None


def proc_name(pid: int) -> str:
    try:
        argv = [a for a in psutil.Process(pid).cmdline() if a]
    except psutil.Error:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("VLLM::"):
        return argv[0].removeprefix("VLLM::")
    if "serve" in argv[1:3]:
        return "api-server"
    if "resource_tracker" in " ".join(argv):
        return "resource-tracker"
    return os.path.basename(argv[0])[:40]


class Sampler(threading.Thread):
    """RSS of every process of the current server (its process group), each second."""

    def __init__(self, run: Run, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.run_, self.period = run, period
        self.samples: list[dict] = []  # {"t", "incarnation", "procs": {pid: [name, VmRSS, RssAnon (KiB)]}}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period):
            try:
                self.sample()
            except Exception:  # a process that vanished mid-read: skip this sample
                pass

    def sample(self, force: bool = False) -> dict | None:
        srv = self.run_.server
        if not force and (not self.run_.serving.is_set() or self.run_.restarting):
            return None  # starting or stopping: not a steady state
        if srv is None or srv.proc is None or srv.proc.poll() is not None:
            return None
        procs = {}
        for pid in group_pids(srv.proc.pid):
            mem = rss_kib(pid)
            if mem and mem[0]:
                procs[pid] = [proc_name(pid), *mem]
        if not procs:
            return None
        row = {"t": time.monotonic() - self.run_.t0, "incarnation": self.run_.incarnation,
               "done": self.run_.done, "procs": procs}
        self.samples.append(row)
        return row


METRICS = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
           "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")


def parse_metrics(text: str) -> dict[str, float]:
    """The values the report uses from a ``/metrics`` page, each summed over its
    labels (engines), and ``num_gpu_blocks`` from ``vllm:cache_config_info``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in METRICS:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
            elif sample.name == "vllm:cache_config_info" and "num_gpu_blocks" not in out \
                    and sample.labels.get("num_gpu_blocks", "").isdigit():
                out["num_gpu_blocks"] = float(sample.labels["num_gpu_blocks"])
    return out


class Servers:
    """Part of :class:`~.run.Run`: the current ``server`` (its ``incarnation``),
    ``restarting`` while it is stopped on purpose, ``serving`` once it answers;
    ``deaths``, ``metrics_by_incarnation``; ``sampler`` samples its memory."""

    def serve_command(self, port: int) -> list[str]:
        s = self.s
        if s.control:  # the same engine settings IAPT forces (no chunked prefill), without IAPT
            return vllm_serve(
                str(self.model_dir), "--served-model-name", BASE, "--dtype", "float32", "--max-model-len",
                str(s.max_model_len), "--seed", "0", "--no-enable-chunked-prefill", "--block-size", str(s.block_size),
                "--num-gpu-blocks-override", str(self.kv_blocks), "--enable-prefix-caching",
                "--enable-prompt-tokens-details", *s.serve_args, port=port)
        return vllm_serve(
            str(self.model_dir), "--served-model-name", BASE, "--dtype", "float32", "--max-model-len",
            str(s.max_model_len), "--seed", "0", "--enable-iapt", "--iapt-modules",
            *[f"{k}={v}" for k, v in self.static.items()], "--iapt-adapter-dir", str(self.adir),
            "--max-iapt-adapters", "4", "--max-cpu-iapt-adapters", "8", "--block-size", str(s.block_size),
            "--num-gpu-blocks-override", str(self.kv_blocks), "--enable-prefix-caching",
            "--enable-prompt-tokens-details", *self.snapshot_args, *s.serve_args, port=port)

    @property
    def kv_blocks(self) -> int:
        """Two phases: a small KV cache until the first planned restart (preemption
        on most steps), a large one after it (prefix-cache hits on most hot prompts)."""
        return self.s.kv_blocks if not self.planned_stops else self.s.kv_blocks_after_restart

    @property
    def snapshot_args(self) -> list[str]:
        """A private snapshot directory, if this vllm-iapt has snapshots."""
        try:
            from vllm_iapt.config import IAPTEngineConfig
        except ImportError:
            return []
        if "snapshot_dir" not in IAPTEngineConfig.model_fields:
            return []
        path = self.work / "snapshots"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return ["--iapt-snapshot-dir", str(path.resolve())]

    def new_server(self) -> ServerProcess:
        """The next incarnation (not started yet); its log is ``logs/soak/server-<n>.log`` in ``--out``."""
        self.incarnation += 1
        env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        return ServerProcess(self.serve_command, self.out / "logs" / "soak" / f"server-{self.incarnation}.log", env,
                             timeout=900, grace=30)

    def alive(self) -> bool:
        return self.server is not None and self.server.proc is not None and self.server.proc.poll() is None

    async def check_alive(self, why: str) -> None:
        """After a failure: if the server died (and no restart is under way), record
        the death with its log's tail and start a new server."""
        await asyncio.sleep(0.5)
        if self.alive() or self.restarting:
            return
        code = self.server.proc.returncode if self.server and self.server.proc else None
        tail = self.server.log_tail(3000) if self.server else ""
        self.deaths.append({"t": round(time.monotonic() - self.t0, 2), "why": why, "returncode": code,
                            "incarnation": self.incarnation, "log_tail": tail[-2500:]})
        self.event("server-death", why=why, returncode=code)
        await self.restart(planned=False)

    async def restart(self, planned: bool) -> None:
        """Stops the server (its metrics kept) and starts the next incarnation, with
        the run-time adapters that were loaded loaded again; traffic waits meanwhile."""
        if self.restarting:
            return
        self.restarting = True
        self.serving.clear()
        try:
            if self.alive():
                try:
                    self.metrics_by_incarnation.append({"incarnation": self.incarnation,
                                                        **parse_metrics(self.server.metrics())})
                except OSError:
                    pass
            self.event("server-stop" if planned else "server-restart-after-death")
            self.sampler.sample(force=True)
            await asyncio.to_thread(self.server.stop)
            if planned:
                self.faults["server_restart"]["injected"] += 1
                self.planned_stops += 1
            self.server = self.new_server()
            await asyncio.to_thread(self.server.start)
            self.sampler.sample(force=True)
            self.event("server-ready", incarnation=self.incarnation)
            # Run-time registrations do not survive a restart: load them again.
            async with httpx.AsyncClient() as http:
                async with self.runtime_lock:
                    for name in sorted(self.loaded_runtime):
                        await self.post(http, "/v1/load_lora_adapter",
                                        {"lora_name": name, "lora_path": str(self.runtime[name].relative_to(self.adir))})
            if planned:
                self.faults["server_restart"]["survived"] += 1
        finally:
            self.restarting = False
            self.serving.set()

    async def drain_metrics(self) -> dict:
        """KV usage once nothing runs (waits up to 30 s for the engine to settle)."""
        last = {}
        for _ in range(60):
            try:
                last = parse_metrics(await asyncio.to_thread(self.server.metrics))
            except OSError:
                await asyncio.sleep(0.5)
                continue
            if last.get("vllm:num_requests_running", 1) == 0 and last.get("vllm:num_requests_waiting", 1) == 0 \
                    and last.get("vllm:kv_cache_usage_perc", 1) == 0:
                break
            await asyncio.sleep(0.5)
        return last
