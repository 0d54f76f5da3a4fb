"""Train one IAPT adapter from a JSONL file with `vllm-iapt train`, then try it.

    .venv/bin/python examples/train_adapter.py --data examples/demo/data/sort.train.jsonl --output-dir runs/my-sort

The JSONL rows are {"prompt": ..., "completion": ...} (or chat {"messages": [...]}).
This is the same command line a user runs by hand:

    vllm-iapt train --base-model examples/demo/model --data FILE --output-dir DIR \
        --num-soft-tokens 4 --bottleneck-dim 64 --num-epochs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from vllm_iapt.reference import IAPTForCausalLM

DEMO = Path(__file__).resolve().parent / "demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEMO / "data" / "sort.train.jsonl"))
    ap.add_argument("--output-dir", default="runs/example-adapter")
    ap.add_argument("--max-steps", type=int, default=-1, help="stop early (default: 2 epochs)")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "vllm_iapt.cli", "train", "--base-model", str(DEMO / "model"),
           "--data", args.data, "--output-dir", args.output_dir, "--num-soft-tokens", "4",
           "--bottleneck-dim", "64", "--learning-rate", "3e-3", "--batch-size", "32", "--num-epochs", "2",
           "--max-steps", str(args.max_steps)]
    print("$", " ".join(cmd))
    subprocess.run(cmd, check=True)

    tok = AutoTokenizer.from_pretrained(DEMO / "model")
    model = IAPTForCausalLM.from_pretrained(str(DEMO / "model"), args.output_dir)
    rows = [json.loads(line) for line in open(args.data)][:5]
    for row in rows:
        out = model.generate(tok(row["prompt"])["input_ids"], 16, eos_token_id=tok.eos_token_id).token_ids
        print(f"{row['prompt']!r} -> {tok.decode(out, skip_special_tokens=True)!r} (want {row['completion']!r})")


if __name__ == "__main__":
    main()
