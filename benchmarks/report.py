"""Turns serve_bench results into JSON, a Markdown table with ratios to the base
model measured in the same run, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

#: Which base-model run each system is also compared with: the one with the
#: engine settings that system forces.
SAME_SETTINGS = {"iapt": "base-nochunk", "lora": "base-eager"}


def _baseline(results: list[dict], system: str, r: dict) -> dict | None:
    for x in results:
        if x["system"] == system and (x["prompt_len"], x["concurrency"]) == (r["prompt_len"], r["concurrency"]):
            return x
    return None


def with_ratios(results: list[dict]) -> list[dict]:
    for r in results:
        kind = "iapt" if r["system"] == "iapt" else "lora" if r["system"].startswith("lora") else None
        for label, system in (("vs_base", "base"), ("vs_same_settings", SAME_SETTINGS.get(kind or "", ""))):
            b = _baseline(results, system, r)
            if b and b is not r:
                r[f"throughput_{label}"] = r["output_throughput"] / b["output_throughput"]
                r[f"ttft_{label}"] = r["median_ttft_ms"] / b["median_ttft_ms"]
                r[f"tpot_{label}"] = r["median_tpot_ms"] / b["median_tpot_ms"]
    return results


def markdown(results: list[dict], meta: dict) -> str:
    out = [f"Model: {meta['model']} ({meta['parameters'] / 1e6:.0f}M parameters), {meta['cores']} CPU cores, "
           f"vLLM {meta['versions']['vllm']}, torch {meta['versions']['torch']}; adapter slots {meta['slots']}, "
           f"IAPT r={meta['bottleneck']}. Command: `{meta['command']}`", "",
           "Ratios are to the base model in the same run: `base` = vLLM defaults; `same` = the base model with the "
           "settings that system forces (IAPT: no chunked prefill; LoRA: eager).", "",
           *([f"All servers ran at once; each figure is the median of {meta['interleaved_repeats']} runs taken in "
              "turn on every server (fresh prompts per round, the same prompts for every system within a round), "
              "so that load from elsewhere hits every system alike. Output tok/s ranges over the rounds are in the "
              "JSON (`output_throughput_range`).", ""] if meta.get("interleaved_repeats") else []),
           "| system | prompt | conc. | N | out tok/s | req/s | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p50/p99 ms "
           "| tok/s vs base | tok/s vs same | TTFT vs base | TTFT vs same | max running |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    for r in results:
        out.append(
            f"| {r['system']} | {r['prompt_len']} | {r['concurrency']} | {r['num_adapters']} | "
            f"{f(r['output_throughput'], '{:.1f}')} | {f(r['request_throughput'], '{:.3f}')} | "
            f"{f(r['median_ttft_ms'], '{:.0f}')}/{f(r['p99_ttft_ms'], '{:.0f}')} | "
            f"{f(r['median_tpot_ms'], '{:.1f}')}/{f(r['p99_tpot_ms'], '{:.1f}')} | "
            f"{f(r['median_itl_ms'], '{:.1f}')}/{f(r['p99_itl_ms'], '{:.1f}')} | "
            f"{f(r.get('throughput_vs_base'))} | {f(r.get('throughput_vs_same_settings'))} | "
            f"{f(r.get('ttft_vs_base'))} | {f(r.get('ttft_vs_same_settings'))} | {r['max_running']:.0f} |")
    notes = sorted({(r["system"], r.get("note", "")) for r in results})
    out += ["", "Systems:", *[f"- `{s}`: {n}" for s, n in notes]]
    return "\n".join(out) + "\n"


def plots(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. Output throughput against the number of adapters (short prompts, the default concurrency).
    sweep = [r for r in results if r["num_adapters"] > 0]
    if sweep:
        p, c = sweep[0]["prompt_len"], sweep[0]["concurrency"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for system in dict.fromkeys(r["system"] for r in sweep):
            xs = sorted((r["num_adapters"], r["output_throughput"]) for r in sweep
                        if r["system"] == system and (r["prompt_len"], r["concurrency"]) == (p, c))
            ax.plot([x for x, _ in xs], [y for _, y in xs], "o-", label=system)
        for r in results:
            if r["num_adapters"] == 0 and (r["prompt_len"], r["concurrency"]) == (p, c):
                ax.axhline(r["output_throughput"], ls="--", lw=1, color="gray")
                ax.text(1, r["output_throughput"], r["system"], fontsize=7, va="bottom", color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct adapters N (requests spread round-robin)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"Throughput vs adapters (prompt {p}, concurrency {c})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_adapters.png", dpi=120)
        plt.close(fig)

    # 2. Running / waiting requests over time at the largest N: what max_loras does.
    n_max = max((r["num_adapters"] for r in results), default=0)
    top = [r for r in results if r["num_adapters"] == n_max and n_max > 0 and r["queue"]]
    if top:
        fig, axes = plt.subplots(len(top), 1, figsize=(6.5, 1.8 * len(top)), sharex=True, squeeze=False)
        for ax, r in zip(axes[:, 0], top):
            t = [s[0] for s in r["queue"]]
            ax.plot(t, [s[1] for s in r["queue"]], label="running")
            ax.plot(t, [s[2] for s in r["queue"]], label="waiting")
            ax.set_ylabel(r["system"], fontsize=8)
        axes[0, 0].legend(fontsize=7)
        axes[0, 0].set_title(f"Requests running/waiting at N={n_max}")
        axes[-1, 0].set_xlabel("seconds")
        fig.tight_layout()
        fig.savefig(out / "queue_at_max_adapters.png", dpi=120)
        plt.close(fig)


def write_report(results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = with_ratios(results)
    (out / "serve_bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "serve_bench.md").write_text(markdown(results, meta))
    plots(results, out)
    print((out / "serve_bench.md").read_text())
