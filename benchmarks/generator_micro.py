"""Microbenchmark: the IAPT generator's cost per prefill row against the decoder
layer it sits in front of, measured and predicted by the formula in docs/engine.md.

    .venv/bin/python benchmarks/generator_micro.py [--quick] [--rows 256] [--out benchmarks/results]

For each hidden size d and bottleneck r it times `generate_packed` (the exact
function the engine runs) and a transformers LlamaDecoderLayer (LLaMA-style
d_ff ~ 2.7 d, head_dim 64) on the same rows, and reports the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from vllm_iapt.generator import LayerGenerator, generate_packed

M = 4


def ffn_size(d: int) -> int:
    return int(round(8 * d / 3 / 64)) * 64  # LLaMA's 2/3 * 4d, rounded like the released models


def predicted_ratio(d: int, r: int, n: int, seq_len: int) -> float:
    d_ff = ffn_size(d)
    gen = 2 * n * r * (d + 2 * M) + 2 * M * r * d
    layer = n * 2 * (2 * d * d + 2 * d * d + 3 * d * d_ff) + 2 * n * seq_len * d  # proj + causal attention
    return gen / layer


def bench(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


@torch.no_grad()
def run(d: int, r: int, rows: int, seqs: int, reps: int) -> dict:
    cfg = LlamaConfig(hidden_size=d, intermediate_size=ffn_size(d), num_attention_heads=d // 64,
                      num_key_value_heads=d // 64, head_dim=64, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    rope = LlamaRotaryEmbedding(cfg)
    seq_len = rows // seqs
    x = torch.randn(seqs, seq_len, d)
    pos = torch.arange(seq_len).unsqueeze(0).expand(seqs, -1)
    emb = rope(x, pos)
    gen = LayerGenerator(d, r, M, "rational").weights()
    packed = x.reshape(-1, d)
    cu = torch.arange(0, rows + 1, seq_len)
    t_gen = bench(lambda: generate_packed(gen, packed, cu), reps)
    t_layer = bench(lambda: layer(x, position_embeddings=emb, attention_mask=None), reps)
    return {"d": d, "r": r, "rows": rows, "sequences": seqs, "generator_s": t_gen, "layer_s": t_layer,
            "generator_us_per_row": 1e6 * t_gen / rows, "layer_us_per_row": 1e6 * t_layer / rows,
            "measured_ratio": t_gen / t_layer, "predicted_ratio": predicted_ratio(d, r, rows, seq_len)}


def write(results: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "generator_micro.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = ["| d | r | generator µs/row | layer µs/row | measured ratio | formula ratio |", "|---|---|---|---|---|---|"]
    for x in results:
        lines.append(f"| {x['d']} | {x['r']} | {x['generator_us_per_row']:.2f} | {x['layer_us_per_row']:.2f} | "
                     f"{x['measured_ratio']:.2%} | {x['predicted_ratio']:.2%} |")
    (out / "generator_micro.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in sorted({x["r"] for x in results}):
        xs = [x for x in results if x["r"] == r]
        ax.plot([x["d"] for x in xs], [100 * x["measured_ratio"] for x in xs], "o-", label=f"measured, r={r}")
        ax.plot([x["d"] for x in xs], [100 * x["predicted_ratio"] for x in xs], "x--", label=f"formula, r={r}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("hidden size d")
    ax.set_ylabel("generator / decoder layer time per prefill row (%)")
    ax.set_title(f"IAPT generator cost ({meta['rows']} prefill rows, m={M})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "generator_micro.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d in {256, 1024}, fewer repetitions")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    dims = [256, 1024] if args.quick else [256, 1024, 4096]
    grid = [(d, r) for d in dims for r in (64, 320)]
    results = [run(d, r, args.rows, args.sequences, reps=2 if args.quick or d >= 4096 else 5)
               for d, r in tqdm(grid, desc="generator microbenchmark")]
    meta = {"rows": args.rows, "sequences": args.sequences, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
            "command": "benchmarks/generator_micro.py" + (" --quick" if args.quick else "")}
    write(results, Path(args.out), meta)
    print((Path(args.out) / "generator_micro.md").read_text())


if __name__ == "__main__":
    main()
