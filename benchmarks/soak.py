"""Soak and fault harness: many concurrent clients against `vllm serve --enable-iapt`,
every answer checked against the reference model, faults injected while it runs.

    ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 .venv/bin/python benchmarks/soak.py   # default: 10,000 requests (~7 min on 2 cores)
    .venv/bin/python benchmarks/soak.py --quick           # a few hundred requests, a few faults (the test suite)
    .venv/bin/python benchmarks/soak.py --requests 2000 --restarts 0 --out /tmp/soak

The server runs on 127.0.0.1 only: the bundled demo model (`examples/demo`) with its
four static tenants, run-time adapters loaded and unloaded over HTTP from a
scratch `--iapt-adapter-dir`, and prefix caching: a small KV cache (forces
preemption) until the planned restart, a large one after it (prefix-cache hits).
Requests mix the base model, static tenants, run-time adapters and one
adapter found by the directory resolver; completions and chat; streaming or not;
prompt lengths 1..max from a fixed pool (so repeated prompts hit the prefix cache).
Decoding is greedy with ``ignore_eos``; every answer is compared, token for token,
with the transformers reference (`vllm_iapt.reference`) for its (adapter, prompt):
an answer equal to another adapter's reference and not to its own is a *leak*.
Prompts whose reference has a near-tie (top-2 log-probability gap below
``--min-margin`` at any generated step, for any adapter) are dropped from the pool
beforehand, so float noise cannot be mistaken for a wrong answer.

Faults, injected while traffic runs: client aborts mid-stream, load/unload churn
(including ``load_inplace``), a catalogue of malformed loads (each must be a 4xx),
adapter files replaced / deleted / re-linked / truncated after they were loaded
(each request must be served with validated content, the content at load or the
new files' once re-validated, or fail cleanly with a 4xx; never another adapter's
or an outside directory's output), and the server stopped and restarted. A server that dies is recorded, restarted, and the
run goes on, so the report says what happened instead of stopping at the first
failure.

Report: ``soak.json``, ``soak.md`` and ``soak.png`` (latency and the resident
memory of every server process over time) in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO = ROOT / "examples" / "demo"

from vllm_iapt.patches.shutdown import MESSAGE as STOPPING_MESSAGE  # noqa: E402
from vllm_iapt.serving.process import ServerProcess, vllm_serve  # noqa: E402

BASE = "demo"
LETTERS = "abcdefgh"

# ---------------------------------------------------------------------------- settings


@dataclasses.dataclass
class Settings:
    requests: int
    max_time: float
    concurrency: int
    restarts: int
    prompts: int
    chat_prompts: int
    max_tokens: int
    max_model_len: int
    kv_blocks: int
    kv_blocks_after_restart: int
    block_size: int
    runtime_adapters: int
    catalogue_rounds: int
    mutation_rounds: int
    churn_period: float
    abort_fraction: float
    min_margin: float
    warmup_fraction: float
    seed: int
    serve_args: list[str]
    control: bool = False  # base model only, on a server without IAPT, no faults


def settings_from(args) -> Settings:
    quick = args.quick
    return Settings(
        requests=args.requests or (500 if quick else 10_000),
        max_time=args.max_time or (150.0 if quick else 4 * 3600.0),
        concurrency=args.concurrency or (8 if quick else 12),
        restarts=(args.restarts if args.restarts is not None else (0 if quick else 1)),
        prompts=24 if quick else 48,
        chat_prompts=8 if quick else 16,
        max_tokens=16,
        max_model_len=256,
        kv_blocks=args.kv_blocks,
        kv_blocks_after_restart=args.kv_blocks_after_restart,
        block_size=32,
        runtime_adapters=3 if quick else 4,
        catalogue_rounds=1 if quick else 3,
        mutation_rounds=1 if quick else 2,
        churn_period=3.0 if quick else 4.0,
        abort_fraction=0.03,
        min_margin=args.min_margin,
        warmup_fraction=0.5 if quick else 0.2,
        seed=args.seed,
        serve_args=list(args.serve_arg or []),
        control=args.control,
    )


# ---------------------------------------------------------------------------- adapters on disk


def write_adapter(path: Path, seed: int, num_soft_tokens: int = 4, **kw) -> Path:
    from vllm_iapt.toy import random_adapter

    kw.setdefault("hidden_size", 128)
    kw.setdefault("num_hidden_layers", 4)
    kw.setdefault("bottleneck_dim", 16)
    random_adapter(path, num_soft_tokens=num_soft_tokens, seed=seed, scale=2.0, **kw)
    return path


def _config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))


def build_catalogue(adir: Path, outside: Path, good: Path) -> list[dict]:
    """Malformed loads, one dict per kind: ``kind``, ``route``, ``body`` (JSON) or
    ``raw`` (bytes), and what is wrong. Every one must be refused with a 4xx."""
    import torch

    bad = adir / "bad"
    if bad.exists():
        shutil.rmtree(bad)
    bad.mkdir(parents=True)
    cfg, tensors = _config(good), _tensors(good)
    out: list[dict] = []

    def add(kind: str, what: str, path: str | None = None, *, name: str | None = None, body: dict | None = None,
            raw: bytes | None = None, route: str = "/v1/load_lora_adapter") -> None:
        if body is None and raw is None:
            body = {"lora_name": name if name is not None else f"bad-{kind}", "lora_path": path}
        out.append({"kind": kind, "what": what, "route": route, "body": body, "raw": raw})

    def variant(kind: str, config: dict | str | None = "same", weights: dict | bytes | None = "same") -> str:
        d = bad / kind
        d.mkdir()
        if config is not None:
            text = json.dumps(cfg) if config == "same" else config if isinstance(config, str) else json.dumps(config)
            (d / "adapter_config.json").write_text(text)
        if weights is not None:
            if isinstance(weights, bytes):
                (d / "adapter_model.safetensors").write_bytes(weights)
            elif weights == "same":
                shutil.copy(good / "adapter_model.safetensors", d / "adapter_model.safetensors")
            else:
                _save_tensors(d, weights)
        return f"bad/{kind}"

    raw_weights = (good / "adapter_model.safetensors").read_bytes()
    add("missing_dir", "directory does not exist", "bad/does-not-exist")
    add("missing_config", "no adapter_config.json", variant("missing_config", config=None))
    add("missing_weights", "no adapter_model.safetensors", variant("missing_weights", weights=None))
    add("config_bad_json", "adapter_config.json is not JSON", variant("config_bad_json", config="{not json"))
    add("config_not_object", "adapter_config.json is a JSON list", variant("config_not_object", config="[1, 2]"))
    add("config_empty", "adapter_config.json is empty", variant("config_empty", config=""))
    add("config_binary", "adapter_config.json is not UTF-8", variant("config_binary", config=None))
    (bad / "config_binary" / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    add("peft_type_lora", "peft_type LORA", variant("peft_type_lora", config={**cfg, "peft_type": "LORA"}))
    add("format_version_2", "unsupported format_version", variant("format_version_2", config={**cfg, "format_version": 2}))
    add("config_unknown_key", "unknown key in the config", variant("config_unknown_key", config={**cfg, "lora_alpha": 8}))
    add("config_wrong_type", "hidden_size is a string", variant("config_wrong_type", config={**cfg, "hidden_size": "128"}))
    add("config_bad_dtype", "torch_dtype int8", variant("config_bad_dtype", config={**cfg, "torch_dtype": "int8"}))
    add("config_huge", "a 4 MB config (unknown key)",
        variant("config_huge", config=json.dumps({**cfg, "padding": "x" * (4 << 20)})))
    add("wrong_hidden_size", "built for hidden_size 64", str(write_adapter(bad / "wrong_hidden_size", 7, hidden_size=64).relative_to(adir)))
    add("wrong_layer_count", "built for 3 layers (model has 4)",
        str(write_adapter(bad / "wrong_layer_count", 8, num_hidden_layers=3).relative_to(adir)))
    add("layers_out_of_range", "layers [0, 7] with 4 layers", variant("layers_out_of_range", config={**cfg, "layers": [0, 7]}))
    add("layers_without_0", "layers [1, 2] (must contain 0)", variant("layers_without_0", config={**cfg, "layers": [1, 2]}))
    add("soft_tokens_over_block", "64 soft tokens > KV block size 32",
        str(write_adapter(bad / "soft_tokens_over_block", 9, num_soft_tokens=64).relative_to(adir)))
    add("weights_truncated", "safetensors cut in half", variant("weights_truncated", weights=raw_weights[: len(raw_weights) // 2]))
    add("weights_garbage", "random bytes", variant("weights_garbage", weights=random.Random(1).randbytes(4096)))
    add("weights_empty", "empty weights file", variant("weights_empty", weights=b""))
    add("weights_header_huge", "header length 2**40", variant("weights_header_huge", weights=(1 << 40).to_bytes(8, "little") + b"{}"))
    add("weights_oversized", "valid file + 64 MiB of trailing bytes",
        variant("weights_oversized", weights=raw_weights + bytes(64 << 20)))
    add("weights_pickle", "a torch pickle named .safetensors", variant("weights_pickle", weights=None))
    torch.save(tensors, bad / "weights_pickle" / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    add("tensor_missing", f"no {key}", variant("tensor_missing", weights={k: v for k, v in tensors.items() if k != key}))
    add("tensor_extra", "an extra tensor", variant("tensor_extra", weights={**tensors, "layers.9.extra": torch.zeros(3)}))
    wkey = next(k for k in sorted(tensors) if k.endswith("down.weight"))
    add("tensor_wrong_shape", f"{wkey} transposed",
        variant("tensor_wrong_shape", weights={**tensors, wkey: tensors[wkey].t().contiguous()}))
    add("tensor_wrong_dtype", "float16 tensors, config float32",
        variant("tensor_wrong_dtype", weights={k: v.half() for k, v in tensors.items()}))
    nan = tensors[wkey].clone()
    nan[0, 0] = float("nan")
    add("tensor_nan", "a NaN weight", variant("tensor_nan", weights={**tensors, wkey: nan}))
    inf = tensors[wkey].clone()
    inf[0, 0] = float("inf")
    add("tensor_inf", "an inf weight", variant("tensor_inf", weights={**tensors, wkey: inf}))
    (bad / "config_is_dir").mkdir()
    (bad / "config_is_dir" / "adapter_config.json").mkdir()
    shutil.copy(good / "adapter_model.safetensors", bad / "config_is_dir" / "adapter_model.safetensors")
    add("config_is_dir", "adapter_config.json is a directory", "bad/config_is_dir")
    d = Path(variant("weights_fifo", weights=None))
    os.mkfifo(adir / d / "adapter_model.safetensors")
    add("weights_fifo", "weights file is a FIFO (reading it would block)", str(d))
    (bad / "path_is_file").write_text("not a directory")
    add("path_is_file", "the path is a file", "bad/path_is_file")
    os.symlink(outside, bad / "symlink_dir_outside")
    add("symlink_dir_outside", "directory symlink to outside the adapter dir", "bad/symlink_dir_outside")
    d = Path(variant("symlink_weights_outside", weights=None))
    os.symlink(outside / "adapter_model.safetensors", adir / d / "adapter_model.safetensors")
    add("symlink_weights_outside", "weights symlinked outside the adapter dir", str(d))
    add("path_traversal", "../ out of the adapter dir", f"../{outside.name}")
    add("absolute_outside", "absolute path outside the adapter dir", str(outside))
    add("name_not_plain", "name with a slash", "bad/missing_config", name="a/b")
    add("name_empty", "empty name", "bad/missing_config", name="")
    add("name_too_long", "name of 200 characters", "bad/missing_config", name="n" * 200)
    add("name_base_model", "the base model's name", str(good.relative_to(adir)), name=BASE)
    add("name_taken", "a static tenant's name, no load_inplace", str(good.relative_to(adir)), name="sort")
    add("body_not_json", "request body is not JSON", raw=b"this is not json")
    add("body_missing_path", "no lora_path", body={"lora_name": "bad-nopath"})
    add("body_wrong_types", "lora_name is a number", body={"lora_name": 5, "lora_path": ["x"]})
    add("unload_unknown", "unload a name that is not loaded", route="/v1/unload_lora_adapter",
        body={"lora_name": "never-loaded"})
    return out


# ---------------------------------------------------------------------------- prompts and references


def build_prompts(s: Settings, tokenizer) -> tuple[list[list[int]], list[tuple[list[dict], list[int]]]]:
    rng = random.Random(s.seed)
    limit = s.max_model_len - 8 - s.max_tokens - 1  # room for the largest soft-token count and the output
    texts = []
    for _ in range(s.prompts // 3):
        xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        texts.append(" ".join(xs) + " =>")
    cmpl = [tokenizer(t)["input_ids"] for t in texts]
    vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 290
    lengths = [1, 2, 3, limit, limit - 1] + [rng.randint(1, limit) for _ in range(s.prompts)]
    for n in lengths[: s.prompts - len(cmpl)]:
        cmpl.append([tokenizer.bos_token_id] + [rng.randrange(3, vocab - 1) for _ in range(n - 1)])
    chat = []
    for i in range(s.chat_prompts):
        xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        content = " ".join(xs) + " =>" if i % 2 == 0 else " ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 60)))
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        chat.append((messages, tokenizer(text, add_special_tokens=False)["input_ids"]))
    return cmpl, chat


def compute_references(model_dir: Path, adapters: dict[str, str | None], prompts: list[list[int]], max_tokens: int,
                       cache: Path) -> dict:
    """``{model: [(tokens, min_margin) per prompt]}``: greedy reference outputs and,
    per output, the smallest top-1/top-2 log-probability gap over its steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_iapt.reference import IAPTForCausalLM

    sig = hashlib.sha256()
    sig.update((model_dir / "model.safetensors").read_bytes())
    for name, path in sorted(adapters.items()):
        sig.update(name.encode())
        if path:
            sig.update((Path(path) / "adapter_model.safetensors").read_bytes())
            sig.update((Path(path) / "adapter_config.json").read_bytes())
    sig.update(json.dumps([prompts, max_tokens]).encode())
    key = sig.hexdigest()
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return data["refs"]
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    refs = {}
    for name, path in tqdm(sorted(adapters.items()), desc="reference outputs", leave=False):
        model = IAPTForCausalLM.from_pretrained(base, path)
        rows = []
        for ids in prompts:
            out = model.generate(ids, max_tokens).token_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids + out]), instruction_lengths=torch.tensor([len(ids)]))["logits"][0]
            lp = torch.log_softmax(logits.float(), dim=-1)[len(ids) - 1: len(ids) - 1 + max_tokens]
            top2 = lp.topk(2, dim=-1).values
            rows.append((out, float((top2[:, 0] - top2[:, 1]).min())))
        refs[name] = rows
    cache.write_text(json.dumps({"key": key, "refs": refs}))
    return refs


# ---------------------------------------------------------------------------- server and memory


def group_pids(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:  # pgrp
                out.append(int(entry))
        except (OSError, ValueError):
            continue
    return out


def rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in KiB. RssAnon (heap, tensors) is what a leak grows;
    VmRSS also counts file-backed pages (libraries, mapped weights), which the
    kernel drops and reloads under memory pressure from other processes."""
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    vals[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        return None
    return (vals["VmRSS"], vals.get("RssAnon", vals["VmRSS"])) if "VmRSS" in vals else None


def proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("VLLM::"):
        return argv[0].removeprefix("VLLM::")
    if "serve" in argv[1:3]:
        return "api-server"
    if "resource_tracker" in " ".join(argv):
        return "resource-tracker"
    return os.path.basename(argv[0])[:40]


class Sampler(threading.Thread):
    """RSS of every process of the current server (its process group), each second."""

    def __init__(self, run: "Run", period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.run_, self.period = run, period
        self.samples: list[dict] = []  # {"t", "incarnation", "procs": {pid: [name, rss_kib]}}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period):
            try:
                self.sample()
            except Exception:  # a process that vanished mid-read: skip this sample
                pass

    def sample(self, force: bool = False) -> dict | None:
        srv = self.run_.server
        if not force and (not self.run_.serving.is_set() or self.run_.restarting):
            return None  # starting or stopping: not a steady state
        if srv is None or srv.proc is None or srv.proc.poll() is not None:
            return None
        procs = {}
        for pid in group_pids(srv.proc.pid):
            mem = rss_kib(pid)
            if mem and mem[0]:
                procs[pid] = [proc_name(pid), *mem]
        if not procs:
            return None
        row = {"t": time.monotonic() - self.run_.t0, "incarnation": self.run_.incarnation,
               "done": self.run_.done, "procs": procs}
        self.samples.append(row)
        return row


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
        vals = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
        if vals:
            out[name] = sum(float(v) for v in vals)
    m = re.search(r'^vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text, re.M)
    if m:
        out["num_gpu_blocks"] = float(m.group(1))
    return out


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Job:
    idx: int
    kind: str  # "cmpl" | "chat"
    stream: bool
    model: str
    prompt: int
    max_tokens: int
    abort_after: int | None = None  # streaming chunks read before the client hangs up


class Run:
    def __init__(self, s: Settings, args) -> None:
        self.s, self.args = s, args
        self.out = Path(args.out)
        self.work = Path(args.work_dir)
        self.rng = random.Random(s.seed)
        self.t0 = time.monotonic()
        self.server: ServerProcess | None = None
        self.incarnation = 0
        self.planned_stops = 0
        self.done = 0
        self.serving = asyncio.Event()
        self.restarting = False
        self.results = Counter()
        self.status_codes = Counter()
        self.unexpected: list[dict] = []  # first few problems, for the report
        self.latencies: list[tuple[float, float, str]] = []  # (t, seconds, kind)
        self.events: list[dict] = []  # faults and restarts, with time
        self.faults: dict[str, Counter] = defaultdict(Counter)
        self.catalogue_results: dict[str, list] = defaultdict(list)
        self.mutation_results: list[dict] = []
        self.deaths: list[dict] = []
        self.metrics_by_incarnation: list[dict] = []
        self.loaded_runtime: set[str] = set()
        self.runtime_lock = asyncio.Lock()
        self.mutation_models: set[str] = set()
        self.prefix_cached_tokens = 0
        self.incarnation_done: list[tuple[int, int]] = []  # (incarnation, requests started before it)
        self.canary: dict = {}
        self.gate: float | None = 0.0  # traffic may not run ahead of the next fault by more than 5% of the run

    # -- set-up ---------------------------------------------------------------
    def prepare(self) -> None:
        s = self.s
        from transformers import AutoTokenizer

        self.model_dir = Path(self.args.model).resolve()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.work.exists():
            shutil.rmtree(self.work / "adapters", ignore_errors=True)
        self.adir = (self.work / "adapters").resolve()
        self.outside = (self.work / "outside-adapter").resolve()
        self.adir.mkdir(parents=True, exist_ok=True)
        write_adapter(self.outside, 999)
        self.static = {name: str((DEMO / "adapters" / name).resolve()) for name in ("sort", "reverse", "upper", "count")}
        # Run-time adapters: the directory name differs from the served name, so the
        # resolver cannot bring an unloaded one back and requests for it get a 404.
        self.runtime = {f"rt{i}": write_adapter(self.adir / "pool" / f"dir-rt{i}", 100 + i, num_soft_tokens=(2, 4, 8, 3)[i % 4])
                        for i in range(s.runtime_adapters)}
        self.resolved = {"found0": write_adapter(self.adir / "found0", 200, num_soft_tokens=5)}
        self.mut_a = write_adapter(self.work / "mut-src" / "a", 300)
        self.mut_b = write_adapter(self.work / "mut-src" / "b", 301)  # same shapes and size as a
        self.catalogue = build_catalogue(self.adir, self.outside, write_adapter(self.adir / "good", 400))
        self.cmpl, self.chat = build_prompts(s, self.tokenizer)
        self.paths: dict[str, str | None] = {BASE: None, **self.static, **{k: str(v) for k, v in self.runtime.items()},
                                             **{k: str(v) for k, v in self.resolved.items()},
                                             "mut:a": str(self.mut_a), "mut:b": str(self.mut_b),
                                             "outside": str(self.outside)}

    def references(self) -> None:
        all_prompts = self.cmpl + [ids for _, ids in self.chat]
        refs = compute_references(self.model_dir, self.paths, all_prompts, self.s.max_tokens,
                                  self.work / "references.json")
        n = len(self.cmpl)
        keep = [i for i in range(len(all_prompts)) if min(refs[m][i][1] for m in refs) >= self.s.min_margin]
        self.dropped_prompts = len(all_prompts) - len(keep)
        self.ref = {(m, "cmpl" if i < n else "chat", i if i < n else i - n): refs[m][i][0]
                    for m in refs for i in keep}
        self.cmpl_ok = [i for i in keep if i < n]
        self.chat_ok = [i - n for i in keep if i >= n]
        served = [m for m in refs if not m.startswith("mut:") and m != "outside"]
        distinct = sum(len({tuple(refs[m][i][0]) for m in served}) == len(served) for i in keep)
        self.distinct_prompts = distinct
        self.served_models = served

    def serve_command(self, port: int) -> list[str]:
        s = self.s
        if s.control:  # the same engine settings IAPT forces (no chunked prefill), without IAPT
            return vllm_serve(
                str(self.model_dir), "--served-model-name", BASE, "--dtype", "float32", "--max-model-len",
                str(s.max_model_len), "--seed", "0", "--no-enable-chunked-prefill", "--block-size", str(s.block_size),
                "--num-gpu-blocks-override", str(self.kv_blocks), "--enable-prefix-caching",
                "--enable-prompt-tokens-details", *s.serve_args, port=port)
        return vllm_serve(
            str(self.model_dir), "--served-model-name", BASE, "--dtype", "float32", "--max-model-len",
            str(s.max_model_len), "--seed", "0", "--enable-iapt", "--iapt-modules",
            *[f"{k}={v}" for k, v in self.static.items()], "--iapt-adapter-dir", str(self.adir),
            "--max-iapt-adapters", "4", "--max-cpu-iapt-adapters", "8", "--block-size", str(s.block_size),
            "--num-gpu-blocks-override", str(self.kv_blocks), "--enable-prefix-caching",
            "--enable-prompt-tokens-details", *self.snapshot_args, *s.serve_args, port=port)

    @property
    def kv_blocks(self) -> int:
        """Two phases: a small KV cache until the first planned restart (preemption
        on most steps), a large one after it (prefix-cache hits on most hot prompts)."""
        return self.s.kv_blocks if not self.planned_stops else self.s.kv_blocks_after_restart

    @property
    def snapshot_args(self) -> list[str]:
        """A private snapshot directory, if this vllm-iapt has snapshots."""
        try:
            from vllm_iapt.config import IAPTEngineConfig
        except ImportError:
            return []
        if "snapshot_dir" not in IAPTEngineConfig.model_fields:
            return []
        path = self.work / "snapshots"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return ["--iapt-snapshot-dir", str(path.resolve())]

    def new_server(self) -> ServerProcess:
        self.incarnation += 1
        env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        return ServerProcess(self.serve_command, self.out / "logs" / "soak" / f"server-{self.incarnation}.log", env,
                             timeout=900, grace=30)

    # -- helpers ----------------------------------------------------------------
    def event(self, kind: str, **kw) -> None:
        self.events.append({"t": round(time.monotonic() - self.t0, 2), "kind": kind, "done": self.done, **kw})

    def problem(self, **kw) -> None:
        if len(self.unexpected) < 50:
            self.unexpected.append({"t": round(time.monotonic() - self.t0, 2), **kw})

    def alive(self) -> bool:
        return self.server is not None and self.server.proc is not None and self.server.proc.poll() is None

    async def post(self, http: httpx.AsyncClient, route: str, body=None, raw: bytes | None = None,
                   timeout: float = 60) -> tuple[int | str, str]:
        try:
            if raw is not None:
                r = await http.post(self.server.url + route, content=raw, timeout=timeout,
                                    headers={"Content-Type": "application/json"})
            else:
                r = await http.post(self.server.url + route, json=body, timeout=timeout)
            return r.status_code, r.text[:400]
        except httpx.TimeoutException:
            return "timeout", ""
        except httpx.HTTPError as e:
            return "connection", repr(e)[:200]

    # -- requests ----------------------------------------------------------------
    def plan(self) -> list[Job]:
        s, rng = self.s, self.rng
        models = ([BASE] * 3 + list(self.static) * 2 + list(self.runtime) * 2 + list(self.resolved))
        if s.control:
            models = [BASE]
        # Warm-up sweep first: every (model, prompt) once, so every adapter and prompt
        # length has been through the engine before memory growth is measured.
        sweep = [(m, kind, p) for m in (models if s.control else self.served_models)
                 for kind, pool in (("cmpl", self.cmpl_ok), ("chat", self.chat_ok)) for p in pool]
        jobs = [Job(i, kind, False, m, p, s.max_tokens) for i, (m, kind, p) in enumerate(sweep[: s.requests // 2])]
        self.warmup_requests = len(jobs)
        # The hottest completion prompts are at least two KV blocks long: only full
        # blocks are cached, so their repeats can hit the prefix cache.
        hot = {"chat": self.chat_ok, "cmpl": sorted(self.cmpl_ok, key=lambda i: len(self.cmpl[i]) < 2 * s.block_size)}
        for i in range(len(jobs), s.requests):
            kind = "chat" if self.chat_ok and rng.random() < 0.3 else "cmpl"
            pool = self.chat_ok if kind == "chat" else self.cmpl_ok
            # Zipf-ish: a few hot prompts (prefix-cache hits) and a long tail.
            prompt = hot[kind][min(int(rng.paretovariate(1.2)) - 1, len(pool) - 1)] if rng.random() < 0.5 else rng.choice(pool)
            stream = rng.random() < 0.5
            abort = rng.randint(1, 3) if stream and rng.random() < s.abort_fraction / 0.5 else None
            jobs.append(Job(i, kind, stream, rng.choice(models), prompt, rng.randint(1, s.max_tokens), abort))
        return jobs

    def body(self, job: Job, model: str | None = None) -> dict:
        body = {"model": model or job.model, "max_tokens": job.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True, "stream": job.stream}
        if job.stream:
            body["stream_options"] = {"include_usage": True}
        if job.kind == "chat":
            body["messages"] = self.chat[job.prompt][0]
        else:
            body["prompt"] = self.cmpl[job.prompt]
        return body

    async def send(self, http: httpx.AsyncClient, job: Job, model: str | None = None) -> dict:
        """One request; returns {"status", "tokens", "aborted", "error"}."""
        route = "/v1/chat/completions" if job.kind == "chat" else "/v1/completions"
        url = self.server.url + route
        body = self.body(job, model)
        try:
            if not job.stream:
                r = await http.post(url, json=body, timeout=self.args.request_timeout)
                if r.status_code != 200:
                    return {"status": r.status_code, "error": r.text[:300]}
                data = r.json()
                self.prefix_cached_tokens += ((data.get("usage") or {}).get("prompt_tokens_details") or {}).get(
                    "cached_tokens") or 0
                return {"status": 200, "tokens": data["choices"][0].get("token_ids")}
            tokens: list[int] = []
            chunks = 0
            async with http.stream("POST", url, json=body, timeout=self.args.request_timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    return {"status": r.status_code, "error": r.text[:300]}
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        err = obj["error"]
                        return {"status": err.get("code", "stream-error"), "error": str(err)[:300]}
                    for c in obj.get("choices") or []:
                        tokens += c.get("token_ids") or (c.get("delta") or {}).get("token_ids") or []
                    usage = obj.get("usage") or {}
                    self.prefix_cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    chunks += 1
                    if job.abort_after is not None and chunks >= job.abort_after:
                        return {"status": 200, "tokens": tokens, "aborted": True}
            return {"status": 200, "tokens": tokens}
        except httpx.TimeoutException:
            return {"status": "timeout", "error": "client timeout"}
        except httpx.HTTPError as e:
            return {"status": "connection", "error": repr(e)[:200]}

    def classify(self, job: Job, res: dict, model_key: str | None = None, others: list[str] | None = None) -> str:
        """correct / leak / mismatch (200s), aborted-ok / aborted-mismatch, or the status."""
        key = model_key or job.model
        status = res["status"]
        if status != 200:
            return f"status:{status}"
        got = res.get("tokens")
        if got is None:
            return "mismatch"
        own = self.ref[(key, job.kind, job.prompt)][: job.max_tokens]
        if res.get("aborted"):
            return "aborted-ok" if own[: len(got)] == got else "aborted-mismatch"
        if got == own:
            return "correct"
        for other in (others if others is not None else self.served_models):
            if other != key and self.ref.get((other, job.kind, job.prompt), [])[: job.max_tokens] == got:
                return "leak"
        return "mismatch"

    def record(self, job: Job, res: dict, verdict: str, latency: float, context: str = "traffic") -> None:
        status = res["status"]
        self.status_codes[str(status)] += 1
        self.latencies.append((time.monotonic() - self.t0, latency, job.kind))
        if verdict.startswith("status:"):
            expected = False
            if status == 404 and job.model in self.runtime:
                expected = True  # unloaded by the churn (or racing with it)
            elif status in ("connection", "timeout") and (self.restarting or not self.alive()):
                expected = True  # in flight while the server was stopped
            if status == 503 and self.restarting and STOPPING_MESSAGE in (res.get("error") or ""):
                self.results["refused-while-stopping"] += 1  # arrived during a planned stop: patches/shutdown.py
            else:
                self.results["expected-unavailable" if expected else "error"] += 1
            if not expected:
                self.problem(what="error", context=context, model=job.model, kind=job.kind, stream=job.stream,
                             status=status, detail=res.get("error"))
        else:
            self.results[verdict] += 1
            if verdict not in ("correct", "aborted-ok"):
                self.problem(what=verdict, context=context, model=job.model, kind=job.kind, stream=job.stream,
                             prompt=job.prompt, max_tokens=job.max_tokens, got=res.get("tokens"),
                             want=self.ref[(job.model, job.kind, job.prompt)][: job.max_tokens])
        if res.get("aborted"):
            self.faults["client_abort"]["injected"] += 1

    async def worker(self, http: httpx.AsyncClient, queue: asyncio.Queue, bar: tqdm, deadline: float) -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if time.monotonic() > deadline:
                self.results["not-sent (time limit)"] += 1
                bar.update()
                continue
            while self.gate is not None and self.done > (self.gate + 0.05) * self.s.requests:
                await asyncio.sleep(0.05)
            await self.serving.wait()
            if job.model in self.runtime and self.loaded_runtime and self.rng.random() < 0.8:
                job.model = self.rng.choice(sorted(self.loaded_runtime))  # mostly loaded ones; some 404s
            t = time.monotonic()
            res = await self.send(http, job)
            verdict = self.classify(job, res)
            self.record(job, res, verdict, time.monotonic() - t)
            self.done += 1
            bar.update()
            if res["status"] in ("connection", "timeout") and not self.restarting:
                await self.check_alive("connection error during traffic")

    # -- faults ----------------------------------------------------------------
    async def check_alive(self, why: str) -> None:
        await asyncio.sleep(0.5)
        if self.alive() or self.restarting:
            return
        code = self.server.proc.returncode if self.server and self.server.proc else None
        tail = self.server.log_tail(3000) if self.server else ""
        self.deaths.append({"t": round(time.monotonic() - self.t0, 2), "why": why, "returncode": code,
                            "incarnation": self.incarnation, "log_tail": tail[-2500:]})
        self.event("server-death", why=why, returncode=code)
        await self.restart(planned=False)

    async def restart(self, planned: bool) -> None:
        if self.restarting:
            return
        self.restarting = True
        self.serving.clear()
        try:
            if self.alive():
                try:
                    self.metrics_by_incarnation.append({"incarnation": self.incarnation,
                                                        **parse_metrics(self.server.metrics())})
                except OSError:
                    pass
            self.event("server-stop" if planned else "server-restart-after-death")
            self.sampler.sample(force=True)
            await asyncio.to_thread(self.server.stop)
            if planned:
                self.faults["server_restart"]["injected"] += 1
                self.planned_stops += 1
            self.server = self.new_server()
            await asyncio.to_thread(self.server.start)
            self.sampler.sample(force=True)
            self.event("server-ready", incarnation=self.incarnation)
            # Run-time registrations do not survive a restart: load them again.
            async with httpx.AsyncClient() as http:
                async with self.runtime_lock:
                    for name in sorted(self.loaded_runtime):
                        await self.post(http, "/v1/load_lora_adapter",
                                        {"lora_name": name, "lora_path": str(self.runtime[name].relative_to(self.adir))})
            if planned:
                self.faults["server_restart"]["survived"] += 1
        finally:
            self.restarting = False
            self.serving.set()

    async def churn(self, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        names = sorted(self.runtime)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.s.churn_period)
                return
            except asyncio.TimeoutError:
                pass
            await self.serving.wait()
            name = self.rng.choice(names)
            async with self.runtime_lock:
                rel = str(self.runtime[name].relative_to(self.adir))
                if name in self.loaded_runtime and self.rng.random() < 0.25:
                    op, body = "reload_inplace", {"lora_name": name, "lora_path": rel, "load_inplace": True}
                    status, text = await self.post(http, "/v1/load_lora_adapter", body)
                    ok = status == 200
                elif name in self.loaded_runtime:
                    op = "unload"
                    status, text = await self.post(http, "/v1/unload_lora_adapter", {"lora_name": name})
                    ok = status == 200
                    if ok:
                        self.loaded_runtime.discard(name)
                else:
                    op = "load"
                    status, text = await self.post(http, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": rel})
                    ok = status == 200
                    if ok:
                        self.loaded_runtime.add(name)
            self.faults[f"churn_{op}"]["injected"] += 1
            if ok:
                self.faults[f"churn_{op}"]["survived"] += 1
            elif not self.restarting:
                self.problem(what=f"churn {op} failed", model=name, status=status, detail=text)
                await self.check_alive(f"churn {op}")

    async def malformed(self, http: httpx.AsyncClient, item: dict) -> None:
        status, text = await self.post(http, item["route"], item["body"], item["raw"], timeout=60)
        if status == "connection" and (self.restarting or not self.alive()):
            await self.check_alive("before a malformed load")  # the server was already down: try again
            await self.serving.wait()
            status, text = await self.post(http, item["route"], item["body"], item["raw"], timeout=60)
        ok = isinstance(status, int) and 400 <= status < 500
        self.catalogue_results[item["kind"]].append(status)
        self.faults["malformed_load"]["injected"] += 1
        if ok:
            self.faults["malformed_load"]["survived"] += 1
        else:
            self.problem(what="malformed load not refused with a 4xx", kind=item["kind"], status=status, detail=text)
            if status == 200 and item["body"] and isinstance(item["body"].get("lora_name"), str):
                await self.post(http, "/v1/unload_lora_adapter", {"lora_name": item["body"]["lora_name"]})
            await self.check_alive(f"malformed load {item['kind']}")
        self.event("malformed-load", fault=item["kind"], status=status)

    MUTATIONS = ("replace_weights_after_use", "replace_same_stamp_before_use", "replace_same_stamp_after_use",
                 "delete_weights_after_use", "delete_dir_before_use", "truncate_weights_after_use",
                 "corrupt_config_after_use", "relink_inside_after_use", "relink_outside_after_use",
                 "replace_and_restore")

    async def mutation(self, http: httpx.AsyncClient, kind: str, n: int) -> None:
        """Load an adapter (content a), change its files as ``kind`` says, then
        send requests: each must be served with content a, or refused with a 4xx."""
        name = f"mut-{n}"
        real = self.adir / "mut" / f"{name}-a"
        shutil.rmtree(self.adir / "mut" / name, ignore_errors=True)
        shutil.rmtree(real, ignore_errors=True)
        real.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.mut_a, real)
        link = self.adir / "mut" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(real.name, link)  # the loaded path is a link, so it can be re-linked
        status, text = await self.post(http, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"mut/{name}"})
        outcome = {"kind": kind, "name": name, "load_status": status, "requests": Counter()}
        self.faults["file_change"]["injected"] += 1
        if status != 200:
            outcome["requests"]["load failed"] += 1
            self.mutation_results.append(outcome)
            self.problem(what="mutation adapter did not load", kind=kind, status=status, detail=text)
            return
        self.mutation_models.add(name)
        prompts = self.cmpl_ok[:2]
        jobs = [Job(-1, "cmpl", i % 2 == 1, name, prompts[i % len(prompts)], self.s.max_tokens) for i in range(4)]

        async def probe(js: list[Job], phase: str) -> None:
            results = await asyncio.gather(*(self.send(http, j) for j in js))
            for j, res in zip(js, results):
                verdict = self.classify(j, res, "mut:a", ["mut:b", "outside", *self.served_models])
                if verdict == "leak":  # equal to another adapter's output
                    b = self.ref[("mut:b", j.kind, j.prompt)][: j.max_tokens]
                    o = self.ref[("outside", j.kind, j.prompt)][: j.max_tokens]
                    verdict = ("served new content" if res.get("tokens") == b else
                               "served outside content" if res.get("tokens") == o else "leak")
                self.status_codes[str(res["status"])] += 1
                st = res["status"]
                if verdict.startswith("status:") and isinstance(st, int) and 400 <= st < 500:
                    verdict = "clean 4xx"
                outcome["requests"][f"{phase}: {verdict}"] += 1
                if not acceptable_change_outcome(verdict):
                    self.problem(what=f"file change '{kind}': {verdict}", phase=phase, status=st,
                                 detail=res.get("error"), got=res.get("tokens"))

        if kind.endswith("after_use") or kind == "replace_and_restore":
            await probe(jobs[:2], "before")
        w = real / "adapter_model.safetensors"
        st = w.stat()
        if kind.startswith("replace_weights") or kind == "replace_and_restore":
            tmp = real / ".tmp"
            shutil.copy(self.mut_b / "adapter_model.safetensors", tmp)
            os.replace(tmp, w)
        elif kind.startswith("replace_same_stamp"):
            data = (self.mut_b / "adapter_model.safetensors").read_bytes()
            assert len(data) == st.st_size
            with open(w, "r+b") as f:  # in place, same size, then the old mtime back
                f.write(data)
            os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif kind.startswith("delete_weights"):
            w.unlink()
        elif kind.startswith("delete_dir"):
            shutil.rmtree(real)
        elif kind.startswith("truncate_weights"):
            with open(w, "r+b") as f:
                f.truncate(st.st_size // 3)
        elif kind.startswith("corrupt_config"):
            cfg = json.loads((real / "adapter_config.json").read_text())
            (real / "adapter_config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
        elif kind.startswith("relink_inside"):
            other = self.adir / "mut" / f"{name}-b"
            shutil.rmtree(other, ignore_errors=True)
            shutil.copytree(self.mut_b, other)
            tmp = self.adir / "mut" / f".{name}.tmp"
            os.symlink(other.name, tmp)
            os.replace(tmp, link)
        elif kind.startswith("relink_outside"):
            tmp = self.adir / "mut" / f".{name}.tmp"
            os.symlink(self.outside, tmp)
            os.replace(tmp, link)
        if kind == "replace_and_restore":
            await probe(jobs[2:], "changed")
            shutil.copy(self.mut_a / "adapter_model.safetensors", w)
            await probe(jobs, "restored")
        else:
            await probe(jobs, "after")
        await asyncio.sleep(0.5)
        alive = self.alive()
        outcome["server_alive"] = alive
        if not alive:
            await self.check_alive(f"file change {kind}")
        else:
            await self.post(http, "/v1/unload_lora_adapter", {"lora_name": name})
        bad = [k for k in outcome["requests"] if not acceptable_change_outcome(k)]
        if alive and not bad:
            self.faults["file_change"]["survived"] += 1
        self.mutation_results.append(outcome)
        self.event("file-change", fault=kind, survived=alive and not bad)

    async def faults_task(self, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        s = self.s
        plan: list[tuple[float, str, object]] = []
        items = [item for _ in range(s.catalogue_rounds) for item in self.catalogue]
        for i, item in enumerate(items):
            plan.append((0.05 + 0.85 * i / len(items), "malformed", item))
        muts = [k for _ in range(s.mutation_rounds) for k in self.MUTATIONS]
        for i, k in enumerate(muts):
            plan.append((0.1 + 0.8 * i / len(muts), "mutation", k))
        for i in range(s.restarts):
            plan.append(((i + 1) / (s.restarts + 1), "restart", None))
        plan.sort(key=lambda x: x[0])
        n_mut = 0
        for frac, what, arg in plan:
            self.gate = frac
            while self.done < frac * s.requests and not stop.is_set():
                await asyncio.sleep(0.2)
            if stop.is_set():
                self.event("fault-not-run (traffic ended)", fault=what)
                continue
            await self.serving.wait()
            if what == "malformed":
                await self.malformed(http, arg)
            elif what == "mutation":
                n_mut += 1
                await self.mutation(http, arg, n_mut)
            else:
                await self.restart(planned=True)
        self.gate = None

    async def run_canary(self, http: httpx.AsyncClient) -> None:
        """Proves the checker can fail: one request to 'sort' is checked as if it
        were for 'reverse', and must be classified as a leak (not counted)."""
        prompt = next((p for p in self.cmpl_ok if self.ref[("sort", "cmpl", p)] != self.ref[("reverse", "cmpl", p)]),
                      None)
        if prompt is None:
            self.canary = {"detected": False, "why": "no prompt separates sort from reverse"}
            return
        job = Job(-1, "cmpl", False, "sort", prompt, self.s.max_tokens)
        res = await self.send(http, job)
        self.canary = {"sent_to": "sort", "checked_as": "reverse", "status": res["status"],
                       "verdict": self.classify(job, res, "reverse"),
                       "verdict_as_sort": self.classify(job, res, "sort")}
        self.canary["detected"] = self.canary["verdict"] == "leak" and self.canary["verdict_as_sort"] == "correct"

    async def drain_metrics(self) -> dict:
        """KV usage once nothing runs (waits up to 30 s for the engine to settle)."""
        last = {}
        for _ in range(60):
            try:
                last = parse_metrics(await asyncio.to_thread(self.server.metrics))
            except OSError:
                await asyncio.sleep(0.5)
                continue
            if last.get("vllm:num_requests_running", 1) == 0 and last.get("vllm:num_requests_waiting", 1) == 0 \
                    and last.get("vllm:kv_cache_usage_perc", 1) == 0:
                break
            await asyncio.sleep(0.5)
        return last

    async def main(self) -> dict:
        s = self.s
        self.sampler = Sampler(self)
        self.server = self.new_server()
        start = asyncio.create_task(asyncio.to_thread(self.server.start))
        await asyncio.to_thread(self.references)  # overlaps the server's start-up
        await start
        self.t0 = time.monotonic()
        self.sampler.sample(force=True)
        self.sampler.start()
        self.event("server-ready", incarnation=self.incarnation)
        self.serving.set()
        jobs = self.plan()
        queue: asyncio.Queue = asyncio.Queue()
        for j in jobs:
            queue.put_nowait(j)
        limits = httpx.Limits(max_connections=s.concurrency + 8, max_keepalive_connections=s.concurrency + 8)
        async with httpx.AsyncClient(limits=limits) as http:
            for name in ([] if s.control else sorted(self.runtime)):
                status, text = await self.post(http, "/v1/load_lora_adapter",
                                               {"lora_name": name, "lora_path": str(self.runtime[name].relative_to(self.adir))})
                if status == 200:
                    self.loaded_runtime.add(name)
                else:
                    self.problem(what="initial load failed", model=name, status=status, detail=text)
            if not s.control:
                await self.run_canary(http)
            stop = asyncio.Event()
            deadline = time.monotonic() + s.max_time
            bar = tqdm(total=len(jobs), desc="soak requests", unit="req", mininterval=1.0)
            side = [] if s.control else [asyncio.create_task(self.churn(http, stop)),
                                         asyncio.create_task(self.faults_task(http, stop))]
            if s.control:
                self.gate = None
            workers = [asyncio.create_task(self.worker(http, queue, bar, deadline)) for _ in range(s.concurrency)]
            await asyncio.gather(*workers)
            stop.set()
            await asyncio.gather(*side)
            bar.close()
            if not self.alive():
                await self.check_alive("dead at the end of traffic")
            drained = await self.drain_metrics()
            self.sampler.sample(force=True)
            self.metrics_by_incarnation.append({"incarnation": self.incarnation, **drained})
        self.sampler.halt.set()
        self.sampler.join()
        self.duration = time.monotonic() - self.t0
        self.server.stop()
        return drained


# ---------------------------------------------------------------------------- report


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


def acceptable_change_outcome(verdict: str) -> bool:
    """After an adapter's files changed, a request may be served with the content
    validated at load ("correct"), with the new files' content once the server
    validated it again ("served new content"), or refused with a 4xx. Anything
    else (another adapter's or an outside directory's output, a wrong answer, a
    5xx, a dropped connection) is a violation."""
    return verdict.split(": ")[-1] in ("correct", "clean 4xx", "served new content")


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
                    "versions": _versions()},
    }


def _pct(xs: list[float], q: float) -> float | None:
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for p in ("vllm", "torch", "transformers", "vllm-iapt"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few hundred requests and a few faults (about 3 minutes)")
    ap.add_argument("--requests", type=int, help="requests to send (default 10000; --quick 300)")
    ap.add_argument("--max-time", type=float, help="stop sending after this many seconds")
    ap.add_argument("--concurrency", type=int, help="concurrent clients (default 12; --quick 8)")
    ap.add_argument("--restarts", type=int, help="planned server stops and restarts (default 1; --quick 0)")
    ap.add_argument("--kv-blocks", type=int, default=12, help="KV cache blocks of 32 tokens (small: forces preemption)")
    ap.add_argument("--kv-blocks-after-restart", type=int, default=192,
                    help="KV cache blocks after the first planned restart (large: prefix-cache hits are common)")
    ap.add_argument("--min-margin", type=float, default=0.005, help="drop prompts with a smaller top-2 log-prob gap")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--model", default=str(DEMO / "model"))
    ap.add_argument("--serve-arg", action="append", help="extra `vllm serve` argument (repeatable)")
    ap.add_argument("--work-dir", default=str(HERE / "work" / "soak"), help="scratch adapters and cached references")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--control-json", help="a --control run's soak.json, to compare the worker's memory with")
    ap.add_argument("--control", action="store_true",
                    help="control run: the base model only, served without IAPT (same engine settings), no faults")
    args = ap.parse_args()
    s = settings_from(args)
    run = Run(s, args)
    run.out.mkdir(parents=True, exist_ok=True)
    run.prepare()
    try:
        drained = asyncio.run(run.main())
    finally:
        if run.server is not None:
            run.server.stop()
    rep = build_report(run, drained, args)
    (run.out / "soak.json").write_text(json.dumps(rep, indent=1, default=str))
    write_markdown(rep, run.out / "soak.md")
    plot(run, run.out / "soak.png")
    print(json.dumps({"requests": rep["requests"], "targets": rep["targets"], "passed": rep["passed"]}, indent=1))
    return 0 if rep["passed"] or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
