"""The report: ``soak.json`` (:func:`build_report`), ``soak.md``
(:func:`write_markdown`) and ``soak.png`` (:func:`plot`)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import ROOT
from .checker import acceptable_change_outcome
from assets import versions  # benchmarks/ is on sys.path (benchmarks/soak.py, tests)

if TYPE_CHECKING:
    from .run import Run


def _memory_env() -> list[str]:
    """Environment settings that change the servers' memory behaviour, as part of the
    command that reproduces a run (e.g. ONEDNN_PRIMITIVE_CACHE_CAPACITY, see docs/reliability.md)."""
    return [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("ONEDNN_", "DNNL_", "MALLOC_"))]


def memory_summary(samples: list[dict], warmup_fraction: float, total_requests: int) -> dict:
    """Per incarnation: RSS of each process at start, after warm-up, at the end;
    growth from warm-up to the end, per process and summed."""
    by_inc: dict[int, list[dict]] = defaultdict(list)
    for row in samples:
        by_inc[row["incarnation"]].append(row)
    out = []
    for inc, rows in sorted(by_inc.items()):
        first, last = rows[0], rows[-1]
        served = last["done"] - first["done"]
        warm_done = first["done"] + warmup_fraction * served
        warm = next((r for r in rows if r["done"] >= warm_done), last)
        procs = {}
        def mib(x):
            return round(x / 1024, 1) if x else None

        for pid, (name, *end) in last["procs"].items():
            start = (first["procs"].get(pid) or [name, None, None])[1:]
            w = (warm["procs"].get(pid) or [name, None, None])[1:]
            end_anon, w_anon = end[-1], w[-1]
            procs[f"{name} (pid {pid})"] = {
                "rss_start_mib": mib(start[0]), "rss_after_warmup_mib": mib(w[0]), "rss_end_mib": mib(end[0]),
                "anon_start_mib": mib(start[-1]), "anon_after_warmup_mib": mib(w_anon), "anon_end_mib": mib(end_anon),
                "growth_after_warmup": round((end_anon - w_anon) / w_anon, 4) if w_anon else None,  # of RssAnon
            }
        tw = sum(v[-1] for p, v in warm["procs"].items() if p in last["procs"])
        te = sum(v[-1] for p, v in last["procs"].items() if p in warm["procs"])
        out.append({"incarnation": inc, "requests_served": served, "seconds": round(last["t"] - first["t"], 1),
                    "warmup_requests": warm["done"] - first["done"],
                    "processes": procs, "total_growth_after_warmup": round((te - tw) / tw, 4) if tw else None,
                    "judged": served >= 0.25 * total_requests})
    return {"incarnations": out}


TIMELINE = "timeline (t s, server, requests done, {process: [RSS, RssAnon] MiB})"


def build_report(run: Run, drained: dict, args) -> dict:
    s = run.s
    res = run.results
    codes = {k: v for k, v in sorted(run.status_codes.items())}
    # A 503 "shutting down" during a planned stop is the server refusing cleanly, like a
    # refused connection; every other 5xx counts.
    five = sum(v for k, v in codes.items() if k.isdigit() and int(k) >= 500) - res["refused-while-stopping"]
    mem = memory_summary(run.sampler.samples, s.warmup_fraction, s.requests)
    judged = [m for m in mem["incarnations"] if m["judged"]]
    growth = max((max([p["growth_after_warmup"] or 0 for p in m["processes"].values()] + [0]) for m in judged),
                 default=None)

    def growth_of(kind: str) -> float | None:
        vals = [p["growth_after_warmup"] or 0 for m in judged for name, p in m["processes"].items()
                if (name.startswith("Worker")) == (kind == "worker")]
        return max(vals) if vals else None

    front_growth, worker_growth = growth_of("front"), growth_of("worker")
    control = None
    if args.control_json:
        c = json.loads(Path(args.control_json).read_text())
        cw = [p["growth_after_warmup"] for m in c["memory"]["incarnations"] if m["judged"]
              for name, p in m["processes"].items() if name.startswith("Worker")]
        timeline = [(row[2], row[3]["Worker"][-1] if isinstance(row[3]["Worker"], list) else row[3]["Worker"])
                    for row in next(v for k, v in c["memory"].items() if k.startswith("timeline"))
                    if row[1] == 1 and "Worker" in row[3]]

        def at(n: int) -> float:  # the control worker's RSS after n requests (linear interpolation)
            for (n0, r0), (n1, r1) in zip(timeline, timeline[1:]):
                if n0 <= n <= n1:
                    return r0 + (r1 - r0) * (n - n0) / max(1, n1 - n0)
            return timeline[-1][1]

        windows = []
        for m in judged:
            w = next((p for name, p in m["processes"].items() if name.startswith("Worker")), None)
            if w and w["growth_after_warmup"] is not None and m["requests_served"] <= timeline[-1][0]:
                cg = at(m["requests_served"]) / at(m["warmup_requests"]) - 1
                windows.append({"server": m["incarnation"], "requests": [m["warmup_requests"], m["requests_served"]],
                                "iapt_worker_growth": w["growth_after_warmup"], "control_worker_growth": round(cg, 4),
                                "excess": round(w["growth_after_warmup"] - cg, 4)})
        control = {"report": args.control_json, "command": c["command"], "requests": c["requests"]["sent"],
                   "same_window": windows, "max_excess": max((x["excess"] for x in windows), default=None),
                   "worker_growth_after_warmup": max(cw) if cw else None,
                   "worker_rss_mib": [(p.get("anon_start_mib", p["rss_start_mib"]),
                                       p.get("anon_after_warmup_mib", p["rss_after_warmup_mib"]),
                                       p.get("anon_end_mib", p["rss_end_mib"]))
                                      for m in c["memory"]["incarnations"] for name, p in m["processes"].items()
                                      if name.startswith("Worker")]}
    faults = {k: dict(v) for k, v in sorted(run.faults.items())}
    kv_blocks = drained.get("vllm:kv_cache_usage_perc", float("nan")) * drained.get("num_gpu_blocks", float("nan"))
    preempt = sum(m.get("vllm:num_preemptions_total", 0) for m in run.metrics_by_incarnation)
    hits = sum(m.get("vllm:prefix_cache_hits_total", 0) for m in run.metrics_by_incarnation)
    queries = sum(m.get("vllm:prefix_cache_queries_total", 0) for m in run.metrics_by_incarnation)
    lat = sorted(x[1] for x in run.latencies)
    sent = sum(v for k, v in res.items() if k != "not-sent (time limit)")
    mutation_violations = sum(v for o in run.mutation_results for k, v in o["requests"].items()
                              if not acceptable_change_outcome(k))
    targets = {
        "mismatches == 0": res["mismatch"] + res["aborted-mismatch"] == 0,
        "leaks == 0": res["leak"] == 0,
        "5xx == 0": five == 0,
        "server deaths == 0": len(run.deaths) == 0,
        "memory growth after warm-up < 5%: API server, engine core": front_growth is not None and front_growth < 0.05,
        "memory growth after warm-up < 5%: worker": worker_growth is not None and worker_growth < 0.05,
        **({"worker growth beyond vLLM's own (control, same requests) < 5 points":
            control["max_excess"] is not None and control["max_excess"] < 0.05} if control else {}),
        "every malformed load refused with a 4xx": all(
            isinstance(x, int) and 400 <= x < 500 for v in run.catalogue_results.values() for x in v),
        "file changes: validated content or clean 4xx": mutation_violations == 0,
        "unexpected errors == 0": res["error"] == 0,
        "KV blocks in use after drain == 0": drained.get("vllm:kv_cache_usage_perc") == 0,
        "checker canary detected": bool(run.canary.get("detected")),
        "all requests sent": res["not-sent (time limit)"] == 0,
    }
    return {
        "command": " ".join([*_memory_env(), "python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "settings": dataclasses.asdict(s),
        "duration_s": round(run.duration, 1),
        "requests": {"planned": s.requests, "sent": sent, "correct": res["correct"], "mismatched": res["mismatch"],
                     "leaked": res["leak"], "aborted_by_client (prefix checked)": res["aborted-ok"],
                     "aborted_by_client_mismatched": res["aborted-mismatch"],
                     "expected_unavailable (unloaded adapter, planned restart)": res["expected-unavailable"],
                     "refused_while_stopping (503 during a planned stop)": res["refused-while-stopping"],
                     "errors": res["error"], "not_sent (time limit)": res["not-sent (time limit)"]},
        "status_codes": codes,
        "latency_s": {"p50": _pct(lat, 0.5), "p90": _pct(lat, 0.9), "p99": _pct(lat, 0.99), "max": lat[-1] if lat else None},
        "throughput_rps": round(sent / run.duration, 2) if run.duration else None,
        "faults": faults,
        "malformed_catalogue": {k: v for k, v in sorted(run.catalogue_results.items())},
        "malformed_kinds": len(run.catalogue),
        "file_changes": [{**o, "requests": dict(o["requests"])} for o in run.mutation_results],
        "server_deaths": run.deaths,
        "kv_after_drain": {"kv_cache_usage_perc": drained.get("vllm:kv_cache_usage_perc"),
                           "num_gpu_blocks": drained.get("num_gpu_blocks"), "blocks_in_use": kv_blocks,
                           "running": drained.get("vllm:num_requests_running"),
                           "waiting": drained.get("vllm:num_requests_waiting")},
        "engine": {"preemptions": preempt, "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
                   "prefix_cached_tokens_reported_to_clients": run.prefix_cached_tokens,
                   "by_server": [{"incarnation": m["incarnation"], "kv_blocks": m.get("num_gpu_blocks"),
                                  "preemptions": m.get("vllm:num_preemptions_total", 0),
                                  "prefix_cache_hit_rate": round(m["vllm:prefix_cache_hits_total"]
                                                                 / m["vllm:prefix_cache_queries_total"], 4)
                                  if m.get("vllm:prefix_cache_queries_total") else None}
                                 for m in run.metrics_by_incarnation]},
        "memory": {**mem, "max_process_growth_after_warmup": growth, "worker_growth_after_warmup": worker_growth,
                   "front_growth_after_warmup": front_growth, "control (no IAPT)": control,
                   TIMELINE: [
                       [row["t"], row["incarnation"], row["done"],
                        {name: [round(rss / 1024, 1), round(anon / 1024, 1)] for name, rss, anon in row["procs"].values()}]
                       for row in run.sampler.samples[:: max(1, len(run.sampler.samples) // 400)]]},
        "pool": {"completion_prompts": len(run.cmpl_ok), "chat_prompts": len(run.chat_ok),
                 "dropped_near_ties": run.dropped_prompts, "models": run.served_models,
                 "prompts_where_every_model_differs": run.distinct_prompts,
                 "prompt_lengths": [min(len(run.cmpl[i]) for i in run.cmpl_ok), max(len(run.cmpl[i]) for i in run.cmpl_ok)]},
        "canary": run.canary,
        "events": run.events,
        "problems (first 50)": run.unexpected,
        "targets": targets,
        "passed": all(targets.values()),
        "machine": {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "versions": versions()},
    }


def _pct(xs: list[float], q: float) -> float | None:
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


def write_markdown(rep: dict, path: Path) -> None:
    r = rep["requests"]
    lines = [
        "# Soak run", "",
        f"Command: `{rep['command']}`", "",
        f"Result: **{'all targets met' if rep['passed'] else 'TARGETS MISSED'}**, {rep['duration_s']} s, "
        f"{rep['throughput_rps']} requests/s, on {rep['machine']['cores']} cores "
        f"({', '.join(f'{k} {v}' for k, v in rep['machine']['versions'].items())}).", "",
        "## Targets", "", "| target | met |", "|---|---|",
        *[f"| {k} | {'yes' if v else '**no**'} |" for k, v in rep["targets"].items()], "",
        "## Requests", "", "| | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in r.items()], "",
        "Status codes: " + ", ".join(f"{k}: {v}" for k, v in rep["status_codes"].items()), "",
        f"Latency (s): p50 {rep['latency_s']['p50']}, p90 {rep['latency_s']['p90']}, p99 {rep['latency_s']['p99']}, "
        f"max {rep['latency_s']['max']}. Engine: {rep['engine']['preemptions']:.0f} preemptions, prefix-cache hit rate "
        f"{rep['engine']['prefix_cache_hit_rate']}; by server: " + "; ".join(
            f"#{e['incarnation']} ({int(e['kv_blocks'] or 0)} KV blocks) {e['preemptions']:.0f} preemptions, hit rate "
            f"{e['prefix_cache_hit_rate']}" for e in rep["engine"]["by_server"]) + ".", "",
        f"Pool: {rep['pool']['completion_prompts']} completion prompts (lengths {rep['pool']['prompt_lengths'][0]}.."
        f"{rep['pool']['prompt_lengths'][1]} tokens) and {rep['pool']['chat_prompts']} chat prompts "
        f"({rep['pool']['dropped_near_ties']} dropped for near-ties) x {len(rep['pool']['models'])} models "
        f"({', '.join(rep['pool']['models'])}); on {rep['pool']['prompts_where_every_model_differs']} prompts every "
        "model's reference differs from every other's.", "",
        "## Faults", "", "| fault | injected | survived |", "|---|---|---|",
        *[f"| {k} | {v.get('injected', 0)} | {v.get('survived', '-' if k == 'client_abort' else 0)} |"
          for k, v in rep["faults"].items()], "",
        f"Client aborts are judged by the end state (server alive, KV cache drained). "
        f"Malformed loads ({rep['malformed_kinds']} kinds; status per attempt):", "",
        "| kind | statuses |", "|---|---|",
        *[f"| {k} | {', '.join(str(x) for x in v)} |" for k, v in rep["malformed_catalogue"].items()], "",
        "File changes after load: each request must be served with validated content (the content at load, "
        "or the new files' content once the server validated it again) or refused with a 4xx; never an outside "
        "directory's or another adapter's output, a 5xx or a dead server:", "",
        "| change | load | outcomes | server alive |", "|---|---|---|---|",
        *[f"| {o['kind']} | {o['load_status']} | {'; '.join(f'{k} x{v}' for k, v in o['requests'].items())} | "
          f"{o.get('server_alive', '-')} |" for o in rep["file_changes"]], "",
        f"Server deaths: {len(rep['server_deaths'])}."]
    for d in rep["server_deaths"]:
        lines += ["", f"- at {d['t']} s ({d['why']}), exit code {d['returncode']}; log tail:", "",
                  "```", *d["log_tail"].splitlines()[-25:], "```"]
    kv = rep["kv_after_drain"]
    lines += ["", "## Resources", "",
              f"After drain: KV cache usage {kv['kv_cache_usage_perc']} of {kv['num_gpu_blocks']} blocks "
              f"(blocks in use: {kv['blocks_in_use']}), running {kv['running']}, waiting {kv['waiting']}.", "",
              "Resident memory of every server process (VmRSS, and RssAnon: anonymous memory, what a leak grows; "
              "VmRSS also counts file-backed pages that the kernel drops and reloads when other processes need "
              "memory). Growth is RssAnon's, from the end of the warm-up (the first "
              f"{100 * rep['settings']['warmup_fraction']:.0f}% of each server's requests) to the end.", "",
              "| server | process | VmRSS start / after warm-up / end (MiB) | RssAnon start / after warm-up / end (MiB) "
              "| growth after warm-up |",
              "|---|---|---|---|---|"]
    for m in rep["memory"]["incarnations"]:
        for name, p in m["processes"].items():
            g = p["growth_after_warmup"]
            lines.append(f"| {m['incarnation']} ({m['requests_served']} req{'' if m['judged'] else ', not judged'}) | "
                         f"{name} | {p['rss_start_mib']} / {p['rss_after_warmup_mib']} / {p['rss_end_mib']} | "
                         f"{p.get('anon_start_mib')} / {p.get('anon_after_warmup_mib')} / {p.get('anon_end_mib')} | "
                         f"{'-' if g is None else f'{100 * g:.2f}%'} |")
    c = rep["memory"].get("control (no IAPT)")
    if c:
        lines += ["", f"Control run without IAPT (the base model only, same engine settings and traffic shape, "
                  f"no faults; `{c['command']}`, {c['requests']} requests): worker RssAnon start / after warm-up / end "
                  f"{' ; '.join(' / '.join(str(x) for x in w) for w in c['worker_rss_mib'])} MiB, growth after warm-up "
                  f"{100 * c['worker_growth_after_warmup']:.2f}% (after its first 20%). Over the same request "
                  "windows as each server above (the control worker's RSS after as many requests as that server's "
                  "warm-up and as its end):", "",
                  "| server | requests (warm-up..end) | worker growth, IAPT | worker growth, control | excess |",
                  "|---|---|---|---|---|",
                  *[f"| {w['server']} | {w['requests'][0]}..{w['requests'][1]} | {100 * w['iapt_worker_growth']:.2f}% | "
                    f"{100 * w['control_worker_growth']:.2f}% | {100 * w['excess']:+.2f} points |" for w in c["same_window"]]]
    lines += ["", "![latency and memory](soak.png)", ""]
    if rep["problems (first 50)"]:
        lines += ["## Problems (first 50)", "", "```"]
        lines += [json.dumps(p)[:400] for p in rep["problems (first 50)"]]
        lines += ["```", ""]
    path.write_text("\n".join(lines))


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for kind, color in (("cmpl", "tab:blue"), ("chat", "tab:orange")):
        pts = [(t, lat) for t, lat, k in run.latencies if k == kind]
        if pts:
            a1.scatter([p[0] for p in pts], [p[1] for p in pts], s=2, alpha=0.4, color=color, label=kind)
    if run.latencies:
        ts = sorted(run.latencies)
        w = max(1, len(ts) // 100)
        a1.plot([ts[i][0] for i in range(w, len(ts), w)],
                [statistics.median(x[1] for x in ts[i - w:i]) for i in range(w, len(ts), w)], color="black",
                label="rolling median")
    a1.set_ylabel("latency (s)")
    a1.set_yscale("log")
    a1.legend(loc="upper right")
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in run.sampler.samples:
        for pid, (name, rss, anon) in row["procs"].items():
            series[f"{name} #{row['incarnation']}"].append((row["t"], rss / 1024, anon / 1024))
    for label, pts in sorted(series.items()):
        if len(pts) > 1 and max(p[1] for p in pts) > 50:
            line, = a2.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
            a2.plot([p[0] for p in pts], [p[2] for p in pts], color=line.get_color(), linestyle=":")
    a2.set_ylabel("RSS (MiB); dotted: RssAnon")
    a2.set_xlabel("time (s)")
    a2.legend(loc="upper left", fontsize=7)
    for e in run.events:
        if e["kind"] in ("server-stop", "server-death", "server-restart-after-death"):
            for ax in (a1, a2):
                ax.axvline(e["t"], color="red", linestyle="--", linewidth=0.8)
    a1.set_title("IAPT soak: latency per request and server memory (red: server stopped or died)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

