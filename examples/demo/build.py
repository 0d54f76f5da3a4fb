"""Rebuild the bundled demo from seeds: tokenizer, base model, four IAPT tenants.

    .venv/bin/python examples/demo/build.py            # about 10-15 minutes on 2 CPU cores
    .venv/bin/python examples/demo/build.py --adapters-only

Writes examples/demo/{model,adapters/<task>,data,results.json,MODEL_CARD.md}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import TASKS, dataset, pretraining_lines  # noqa: E402

from vllm_iapt.reference import IAPTForCausalLM  # noqa: E402
from vllm_iapt.toy import build_llama, build_tokenizer  # noqa: E402
from vllm_iapt.train import TrainConfig, train  # noqa: E402

SEED = 1234
MODEL = dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=512, max_position_embeddings=256)
PRETRAIN = dict(lines=60_000, steps=3000, batch=64, lr=3e-3, warmup=100)
ADAPTER = dict(num_soft_tokens=4, bottleneck_dim=64, learning_rate=5e-3, num_epochs=10, batch_size=32, n_train=4000)
#: Harder tasks get more soft tokens, a wider bottleneck and longer training.
ADAPTER_OVERRIDES = {
    "reverse": dict(num_soft_tokens=8, bottleneck_dim=128, num_epochs=25),
    "upper": dict(num_soft_tokens=8, bottleneck_dim=128, num_epochs=25),
}
N_EVAL = 200


def pretrain(model_dir: Path) -> None:
    lines = pretraining_lines(PRETRAIN["lines"], SEED)
    tok = build_tokenizer(lines, model_dir, vocab_size=300)
    model = build_llama(model_dir, vocab_size=len(tok), seed=SEED, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MODEL)
    seqs = [tok(line)["input_ids"] + [tok.eos_token_id] for line in lines]
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    steps, warm = PRETRAIN["steps"], PRETRAIN["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(SEED)
    model.train()
    bar = tqdm(range(steps), desc="pretraining the demo base model")
    for _ in bar:
        batch = rng.sample(seqs, PRETRAIN["batch"])
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(s)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@torch.no_grad()
def accuracy(model: IAPTForCausalLM, tok, rows: list[dict]) -> float:
    hits = 0
    for r in rows:
        ids = tok(r["prompt"])["input_ids"]
        out = model.generate(ids, 16, eos_token_id=tok.eos_token_id).token_ids
        hits += tok.decode(out, skip_special_tokens=True) == r["completion"]
    return hits / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters-only", action="store_true", help="keep the base model, retrain the tenants")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), help="tenants to (re)train (default: all)")
    ap.add_argument("--eval-only", action="store_true", help="train nothing; re-measure and rewrite the card")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    model_dir = HERE / "model"
    if not (args.adapters_only or args.eval_only):
        pretrain(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    results: dict = {"base_model": {}, "adapters": {}, "tagged_base": {}}
    plain = IAPTForCausalLM(base)
    for task in TASKS:
        train_rows = dataset(task, ADAPTER["n_train"], SEED)
        eval_rows = dataset(task, N_EVAL, SEED + 1)
        write_jsonl(HERE / "data" / f"{task}.train.jsonl", train_rows)
        write_jsonl(HERE / "data" / f"{task}.eval.jsonl", eval_rows)
        out = HERE / "adapters" / task
        hp = {**ADAPTER, **ADAPTER_OVERRIDES.get(task, {})}
        if task in args.tasks and not args.eval_only:
            train(TrainConfig(
                base_model=str(model_dir), data=str(HERE / "data" / f"{task}.train.jsonl"),
                eval_data=str(HERE / "data" / f"{task}.eval.jsonl"), output_dir=str(out), seed=SEED,
                num_soft_tokens=hp["num_soft_tokens"], bottleneck_dim=hp["bottleneck_dim"],
                learning_rate=hp["learning_rate"], num_epochs=hp["num_epochs"],
                batch_size=hp["batch_size"], eval_steps=500, save_steps=100_000, logging_steps=100,
                # The trainer's defaults when these adapters were trained (they changed since).
                init="random", rational_learning_rate=1e-2))
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            (out / "train_metrics.json").unlink(missing_ok=True)
        tuned = IAPTForCausalLM.from_pretrained(base, out)
        results["adapters"][task] = {"accuracy": accuracy(tuned, tok, eval_rows), **{
            k: hp[k] for k in ("num_soft_tokens", "bottleneck_dim", "num_epochs", "learning_rate")}}
        results["base_model"][task] = accuracy(plain, tok, eval_rows)
        tagged = [dict(zip(("prompt", "completion"), (f"{task}: {r['prompt']}", r["completion"]))) for r in eval_rows]
        results["tagged_base"][task] = accuracy(plain, tok, tagged)
        print(task, results["adapters"][task], "base:", results["base_model"][task], "tagged base:", results["tagged_base"][task])
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_card(results)


def write_card(results: dict) -> None:
    rows = "\n".join(
        f"| {t} | m={a['num_soft_tokens']}, r={a['bottleneck_dim']}, {a['num_epochs']} epochs, lr {a['learning_rate']} "
        f"| {a['accuracy']:.1%} | {results['base_model'][t]:.1%} | {results['tagged_base'][t]:.1%} |"
        for t, a in results["adapters"].items())
    (HERE / "MODEL_CARD.md").write_text(f"""# The vllm-iapt demo: a tiny LLaMA and four IAPT tenants

Everything here was made on a CPU by `examples/demo/build.py` from seed {SEED}; run it
again to regenerate it (about 10-15 minutes on 2 cores; thread scheduling can change
the last digits of the weights, not the results).

**Base model** (`model/`): LLaMA architecture, d={MODEL['hidden_size']}, {MODEL['num_layers']} layers,
{MODEL['num_heads']} heads of 64, d_ff={MODEL['intermediate_size']}, a byte-level BPE tokenizer trained on its own
corpus. Pretrained for {PRETRAIN['steps']} steps (batch {PRETRAIN['batch']}, AdamW, lr {PRETRAIN['lr']}, cosine) on
{PRETRAIN['lines']:,} synthetic lines with an explicit task tag, for example
`sort: c a b => a b c`, `reverse: c a b => b a c`, `upper: c a b => C A B`, `count: c a b => 3`
(3-6 letters from a-h).

**Tenants** (`adapters/<task>/`): IAPT adapters (rational activation, every layer)
trained with `vllm-iapt train` on {ADAPTER['n_train']} *untagged* prompts (`c a b =>` -> ` a b c`) each,
batch {ADAPTER['batch_size']}, AdamW with warm-up and linear decay: the task comes only from the adapter.
Soft tokens m, bottleneck r, epochs and learning rate per tenant are in the table.
Training data and the held-out sets are in `data/`.

**Held-out exact match** ({N_EVAL} prompts per task, greedy, reference model):

| task | tenant | IAPT tenant, untagged prompt | base model, untagged prompt | base model, tagged prompt |
|---|---|---|---|---|
{rows}

`examples/demo/evaluate.py` measures the same through the vLLM engine and a running server.
""")


if __name__ == "__main__":
    main()
