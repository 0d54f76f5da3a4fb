"""What turning chunked prefill off costs the base model's tenants.

IAPT prefills each adapter prompt in one step (its generators pool every
instruction row of a layer at once), so with IAPT enabled vLLM runs without
chunked prefill, and vLLM then raises ``max_num_batched_tokens`` to
``max_model_len``: one step may prefill a whole long prompt while every running
sequence waits for its next token. This benchmark measures that on base-model
traffic only: a decode-heavy stream (short prompts, long outputs) runs while a
second client sends prompts close to ``max_model_len``. It reports the decode
stream's inter-token latency (p50/p99) and the long prompts' TTFT for

- ``base``: vLLM defaults (chunked prefill, vLLM's default token budget),
- ``base-nochunk``: ``--no-enable-chunked-prefill`` (what IAPT forces),
- ``iapt``: an IAPT server (adapters loaded) answering the same base-model traffic.

    .venv/bin/python benchmarks/chunking_cost.py             # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/chunking_cost.py --quick     # plumbing, tiny model
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vllm_iapt.serving.process import ServerProcess, vllm_serve  # noqa: E402
from assets import SIZES, build_model, iapt_adapters  # noqa: E402
from serve_bench import Run, System, bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work-dir", default=str(HERE / "work"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    size_name = "tiny" if args.quick else "default"
    size = SIZES[size_name]
    work, out = Path(args.work_dir) / size_name, Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(work / "model", size)
    adapters = iapt_adapters(work / "adapters", size, 4, 64)
    long_len = args.max_model_len - 64 - 8
    if args.quick:
        decode, long = Run(32, 32, 2, 0, 4), Run(long_len, 4, 1, 0, 2)
    else:
        decode, long = Run(32, 256, 4, 0, 16), Run(long_len, 4, 1, 0, 6)
    systems = [
        System("base", ["--max-num-batched-tokens", "2048"],
               note="vLLM defaults: chunked prefill, token budget 2048 (vLLM's default for an API server on CPU)"),
        System("base-nochunk", ["--no-enable-chunked-prefill"], note="what IAPT forces: no chunked prefill"),
        System("iapt", ["--enable-iapt", "--iapt-modules", *[f"{p.name}={p}" for p in adapters]],
               note="IAPT enabled (4 adapters loaded), base-model traffic only"),
    ]
    common = ["--dtype", "float32", "--max-model-len", str(args.max_model_len), "--seed", "0",
              "--served-model-name", str(model_dir)]
    results = []
    for system in tqdm(systems, desc="servers"):
        cmd = lambda port: vllm_serve(str(model_dir), *common, *system.serve_args, port=port)  # noqa: E731
        with ServerProcess(cmd, out / "logs" / f"chunking-{system.name}.log", {"VLLM_CPU_KVCACHE_SPACE": "4"}) as srv:
            bench(srv, model_dir, system, Run(long_len, 4, 1, 0, 1), raw, args.seed + 1,
                  name=f"chunking-{system.name}-warmup.json")
            got: dict[str, dict] = {}

            def one(kind: str, run: Run) -> None:
                got[kind] = bench(srv, model_dir, system, run, raw, args.seed, name=f"chunking-{system.name}-{kind}.json")

            threads = [threading.Thread(target=one, args=a) for a in (("decode", decode), ("long", long))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if set(got) != {"decode", "long"}:
                raise RuntimeError(f"a client failed for {system.name}; see {out / 'logs'}")
            budget = 2048 if system.name == "base" else _budget(srv) or max(args.max_model_len, 2048)
            results.append({"system": system.name, "note": system.note, "max_num_batched_tokens": budget,
                            "decode": {k: got["decode"][k] for k in ("median_itl_ms", "p99_itl_ms", "median_tpot_ms",
                                                                     "p99_tpot_ms", "output_throughput", "completed")},
                            "long": {k: got["long"][k] for k in ("median_ttft_ms", "p99_ttft_ms", "completed")},
                            "serve_command": " ".join(srv.cmd)})
    meta = {"model": size_name, "parameters": size.num_parameters(), "command": " ".join(sys.argv),
            "decode_stream": vars(decode) if hasattr(decode, "__dict__") else decode.__repr__(),
            "long_stream": long.__repr__()}
    (out / "chunking_cost.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = _markdown(results, meta, decode, long)
    (out / "chunking_cost.md").write_text(md)
    print(md)


def _budget(srv: ServerProcess) -> int | None:
    """The token budget the server chose, read from its log line."""
    import re

    m = re.findall(r"max_num_batched_tokens=(\d+)", srv.log_path.read_text(errors="replace"))
    return int(m[-1]) if m else None


def _markdown(results: list[dict], meta: dict, decode: Run, long: Run) -> str:
    base = next(r for r in results if r["system"] == "base")
    rows = ["| system | token budget | decode ITL p50/p99 ms | decode TPOT p99 ms | decode tok/s | long TTFT p50 ms "
            "| ITL p99 vs base | long TTFT vs base |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        d, lg = r["decode"], r["long"]
        rows.append(f"| {r['system']} | {r['max_num_batched_tokens'] or '?'} | {d['median_itl_ms']:.1f}/{d['p99_itl_ms']:.1f} | "
                    f"{d['p99_tpot_ms']:.1f} | {d['output_throughput']:.1f} | {lg['median_ttft_ms']:.0f} | "
                    f"{d['p99_itl_ms'] / base['decode']['p99_itl_ms']:.2f} | "
                    f"{lg['median_ttft_ms'] / base['long']['median_ttft_ms']:.2f} |")
    return "\n".join([
        f"Model: {meta['model']} ({meta['parameters'] / 1e6:.0f}M parameters). Command: `{meta['command']}`", "",
        f"Decode stream: prompt {decode.prompt_len}, output {decode.output_len}, concurrency {decode.concurrency}, "
        f"{decode.num_prompts} requests; long stream at the same time: prompt {long.prompt_len}, output "
        f"{long.output_len}, concurrency {long.concurrency}, {long.num_prompts} requests. All base-model traffic.", "",
        *rows, "",
        *[f"- `{r['system']}`: {r['note']}" for r in results]]) + "\n"


if __name__ == "__main__":
    main()
