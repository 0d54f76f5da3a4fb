"""Quick start without downloads: build a tiny LLaMA, train an IAPT adapter on a
copy task the base model cannot do, and compare greedy generations.

    .venv/bin/python examples/quickstart.py [--work-dir runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from transformers import AutoTokenizer

from vllm_iapt.reference import IAPTForCausalLM
from vllm_iapt.toy import build_llama, build_tokenizer
from vllm_iapt.train import TrainConfig, train

WORDS = ["alpha", "beta", "gamma", "delta", "omega"]


def make_data(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            f.write(json.dumps({"prompt": " ".join(words), "completion": f" {words[0]} {words[0]}"}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work-dir", default="runs/quickstart")
    args = ap.parse_args()
    work = Path(args.work_dir)
    model_dir, adapter_dir = work / "model", work / "adapter-copy-first"
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer([" ".join(random.Random(i).choices(WORDS, k=8)) for i in range(500)], model_dir, 300)
    build_llama(model_dir, vocab_size=len(tok), initializer_range=0.1, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    make_data(work / "train.jsonl", 400, 0)
    metrics = train(TrainConfig(base_model=str(model_dir), data=str(work / "train.jsonl"), output_dir=str(adapter_dir),
                                bottleneck_dim=32, learning_rate=5e-3, num_epochs=5, batch_size=16))
    print(f"held-out loss after training: {metrics['eval_loss']:.3f}")

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = IAPTForCausalLM.from_pretrained(model_dir)
    tuned = IAPTForCausalLM.from_pretrained(base.base, adapter_dir)
    for prompt in ["gamma alpha beta", "omega delta", "beta beta gamma omega"]:
        ids = tok(prompt)["input_ids"]
        outs = {name: tok.decode(m.generate(ids, 4, eos_token_id=tok.eos_token_id).token_ids,
                                 skip_special_tokens=True) for name, m in (("base", base), ("iapt", tuned))}
        print(f"{prompt!r:28} base -> {outs['base']!r:32} iapt -> {outs['iapt']!r}")


if __name__ == "__main__":
    main()
