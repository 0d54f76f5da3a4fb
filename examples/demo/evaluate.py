"""Exact-match accuracy of every demo tenant (and the base model) through the
offline engine and, given --server-url, through a running server's OpenAI API.

    .venv/bin/python examples/demo/evaluate.py                       # offline engine only
    .venv/bin/python examples/demo/evaluate.py --server-url http://127.0.0.1:8000/v1
    .venv/bin/python examples/demo/evaluate.py --limit 20 --json out.json

The server must have been started with the demo tenants as model names (see the
README). Both paths run greedy decoding on the held-out sets in examples/demo/data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import TASKS  # noqa: E402

MAX_TOKENS = 16


def load_eval(task: str, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in (HERE / "data" / f"{task}.eval.jsonl").read_text().splitlines()]
    return rows[:limit] if limit else rows


def offline(limit: int | None) -> dict[str, dict[str, float]]:
    """{tenant: {task: accuracy}} through vllm.LLM, all tenants in one batch."""
    from vllm import LLM, SamplingParams

    from vllm_iapt import IAPTRequest

    llm = LLM(model=str(HERE / "model"), dtype="float32", max_model_len=256, seed=0,
              additional_config={"iapt": {}})
    tenants = {"base": None} | {t: IAPTRequest(t, i + 1, str(HERE / "adapters" / t)) for i, t in enumerate(TASKS)}
    prompts, loras, keys = [], [], []
    for tenant, req in tenants.items():
        for task in TASKS if tenant == "base" else [tenant]:
            for row in load_eval(task, limit):
                prompts.append(row["prompt"])
                loras.append(req)
                keys.append((tenant, task, row["completion"]))
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), lora_request=loras)
    return _score(keys, [o.outputs[0].text for o in outs])


def server(url: str, limit: int | None) -> dict[str, dict[str, float]]:
    """The same through the OpenAI API: model = tenant name, or the base model's id."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    ids = [m.id for m in client.models.list().data]
    base = next(i for i in ids if i not in TASKS)
    jobs = []
    for tenant in ["base", *TASKS]:
        for task in TASKS if tenant == "base" else [tenant]:
            for row in load_eval(task, limit):
                jobs.append((tenant, task, row))

    def call(job):
        tenant, _, row = job
        r = client.completions.create(model=base if tenant == "base" else tenant, prompt=row["prompt"],
                                      max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(call, jobs))
    return _score([(t, k, r["completion"]) for t, k, r in jobs], texts)


def _score(keys, texts) -> dict[str, dict[str, float]]:
    hits: dict[str, dict[str, list[int]]] = {}
    for (tenant, task, want), got in zip(keys, texts):
        hits.setdefault(tenant, {}).setdefault(task, []).append(int(got == want))
    return {t: {k: sum(v) / len(v) for k, v in d.items()} for t, d in hits.items()}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    paths = list(results)
    lines = ["| tenant | task | " + " | ".join(paths) + " |", "|---|---|" + "---|" * len(paths)]
    first = results[paths[0]]
    for tenant in first:
        for task in first[tenant]:
            cells = " | ".join(f"{results[p][tenant][task]:.1%}" for p in paths)
            lines.append(f"| {tenant} | {task} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server-url", help="OpenAI base URL of a running demo server, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline engine")
    ap.add_argument("--limit", type=int, help="held-out examples per task (default: all 200)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    results = {}
    if not args.no_offline:
        results["offline engine"] = offline(args.limit)
    if args.server_url:
        results["server (OpenAI API)"] = server(args.server_url, args.limit)
    print(table(results))
    if len(results) == 2:
        a, b = results.values()
        agree = a == b
        print("offline engine and server agree" if agree else "MISMATCH between offline engine and server")
        if not agree:
            sys.exit(1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
