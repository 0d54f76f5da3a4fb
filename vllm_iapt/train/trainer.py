"""Train an IAPT adapter with ``transformers.Trainer``.

The Trainer brings the loop, AdamW, warm-up + linear decay, gradient
accumulation, bf16 autocast, checkpoints with optimizer/scheduler/RNG state,
evaluation and the progress bar. We add only what is IAPT-specific: the frozen
base wrapped by :class:`IAPTForCausalLM`, a separate learning rate for the
rational coefficients, and checkpoints/outputs in the adapter format of docs/iapt.md, section 6.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from vllm_iapt.adapter import load_adapter
from vllm_iapt.config import AdapterConfig
from vllm_iapt.generator import Activation
from vllm_iapt.reference.model import IAPTForCausalLM
from vllm_iapt.train.data import ExampleDataset, collate, load_examples

logger = logging.getLogger(__name__)

METRICS_NAME = "train_metrics.json"


class TrainConfig(BaseModel):
    """Everything ``vllm-iapt train`` accepts (each field is a ``--flag``)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="base model directory (transformers format)")
    data: str = Field(description="training JSONL: {prompt, completion} or {messages}")
    output_dir: str = Field(description="where the adapter (and checkpoints/) are written")
    eval_data: str | None = Field(None, description="held-out JSONL; default: split off eval_fraction of data")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out share of data when eval_data is unset")
    num_soft_tokens: int = Field(4, ge=1, description="m, soft tokens per layer")
    bottleneck_dim: int = Field(64, ge=1, description="r, generator bottleneck")
    activation: Activation = Field("rational", description="generator activation")
    layers: list[int] | None = Field(None, description="layers with a generator (default all; must contain 0)")
    learning_rate: float = Field(1e-3, gt=0)
    rational_learning_rate: float | None = Field(
        None, gt=0, description="learning rate of the rational coefficients (default: learning_rate; a fixed 1e-2 "
        "diverged at bottleneck 256 on SmolLM2-135M, benchmarks/results/adapter_quality.md)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    num_epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="if > 0, overrides num_epochs")
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Literal["float32", "bfloat16"] = Field("float32", description="compute precision (bf16 = autocast)")
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="torch_dtype of the adapter")
    max_length: int = Field(1024, ge=2, description="instruction + completion tokens per example")
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(100, ge=1)
    logging_steps: int = Field(10, ge=1)
    init: Literal["random", "first_token"] = Field(
        "first_token", description="generator initialisation: first_token (each layer's up.bias = the hidden "
        "state entering that layer at the first instruction token, so the soft rows start as copies of the "
        "sequence's first row, the attention sink of a pretrained model: training starts at the base model) "
        "or random (up.bias zero: the model starts worse than the base model; docs/iapt.md section 8)")
    seed: int = 0
    resume: bool = Field(False, description="resume from the last checkpoint in output_dir/checkpoints")
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not Path(self.base_model).is_dir():
            raise ValueError(f"base_model {self.base_model!r} is not a directory")
        for f in (self.data, self.eval_data):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"data file {f!r} does not exist")
        return self


class IAPTTrainer(Trainer):
    """``Trainer`` whose checkpoints are IAPT adapter directories."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        self.model.save_adapter(output_dir, torch_dtype="float32")  # checkpoints keep full precision

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        model.load_adapter_tensors(load_adapter(resume_from_checkpoint).tensors)


def split_examples(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, held out): ``fraction`` of ``items`` held out, chosen by ``seed``."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(items) * fraction))
    if fraction > 0 and n_eval == 0 and len(items) > 1:
        n_eval = 1
    ev = [items[i] for i in order[:n_eval]]
    tr = [items[i] for i in order[n_eval:]]
    return tr, ev


def build_model(cfg: TrainConfig, base=None) -> IAPTForCausalLM:
    base = base or AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    acfg = AdapterConfig(
        peft_type="IAPT", format_version=1, base_model_name_or_path=os.path.abspath(cfg.base_model),
        hidden_size=base.config.hidden_size, num_hidden_layers=base.config.num_hidden_layers,
        num_soft_tokens=cfg.num_soft_tokens, bottleneck_dim=cfg.bottleneck_dim, layers=cfg.layers,
        activation=cfg.activation, torch_dtype=cfg.save_dtype,
    )
    return IAPTForCausalLM(base, acfg)


@torch.no_grad()
def init_from_first_token(model: IAPTForCausalLM, instructions: list[list[int]]) -> None:
    """Sets every generator's ``up.bias`` to the hidden state entering its layer at the
    first instruction token (averaged over ``instructions``; position 0, where that
    state does not depend on the rest of the prompt).

    With the default init the soft rows start near zero, which a pretrained model has
    never seen at the head of a sequence: its first row is the attention sink most
    heads rely on, and training from there diverged on SmolLM2-135M. Starting the
    soft rows as copies of the first row keeps the model close to the base model at
    step 0 (the up projection's weight stays small and random, so gradients flow).
    """
    firsts = torch.tensor([ids[0] for ids in instructions if ids])
    out = model.base(input_ids=firsts.unsqueeze(1), output_hidden_states=True)
    for layer, g in model.generators.items():
        h = out.hidden_states[int(layer)][:, 0].float().mean(0)  # the input of decoder layer `layer`
        g.up.bias.copy_(h.to(g.up.bias.dtype))


def parameter_groups(model: IAPTForCausalLM, cfg: TrainConfig) -> list[dict]:
    """The generators' parameters at ``learning_rate``; the rational activation's
    coefficients, without weight decay, at ``rational_learning_rate`` (default: the same)."""
    rational = [p for n, p in model.generators.named_parameters() if n.endswith(("numerator", "denominator"))]
    others = [p for n, p in model.generators.named_parameters() if not n.endswith(("numerator", "denominator"))]
    groups = [{"params": others, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}]
    if rational:
        groups.append({"params": rational, "lr": cfg.rational_learning_rate or cfg.learning_rate, "weight_decay": 0.0})
    return groups


def training_arguments(cfg: TrainConfig, has_eval: bool) -> TrainingArguments:
    """The ``transformers.Trainer`` settings of :func:`train`: also the PEFT baselines'
    in ``benchmarks/adapter_quality.py``, so that every method trains on one schedule."""
    return TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        bf16=cfg.precision == "bfloat16",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
    )


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train, write the adapter to ``cfg.output_dir`` and return the final metrics."""
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    examples = load_examples(tokenizer, cfg.data, cfg.max_length)
    if cfg.eval_data:
        train_ex, eval_ex = examples, load_examples(tokenizer, cfg.eval_data, cfg.max_length)
    else:
        train_ex, eval_ex = split_examples(examples, cfg.eval_fraction, cfg.seed)
    model = build_model(cfg)
    model.base.eval()  # frozen; no dropout in the base
    if cfg.init == "first_token" and not cfg.resume:
        init_from_first_token(model, [e.instruction_ids for e in train_ex[:16]])

    optimizer = torch.optim.AdamW(parameter_groups(model, cfg))

    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    has_eval = len(eval_ex) > 0
    args = training_arguments(cfg, has_eval)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = IAPTTrainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(train_ex),
        eval_dataset=ExampleDataset(eval_ex) if has_eval else None,
        data_collator=lambda b: collate(b, pad_id),
        optimizers=(optimizer, None),
    )
    resume = get_last_checkpoint(str(ckpt_dir)) if cfg.resume and ckpt_dir.is_dir() else None
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, float] = {"train_examples": len(train_ex), "eval_examples": len(eval_ex)}
    if has_eval:
        metrics.update(trainer.evaluate())
    model.save_adapter(cfg.output_dir, torch_dtype=cfg.save_dtype)
    (Path(cfg.output_dir) / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def evaluate_loss(model: IAPTForCausalLM, tokenizer, path: str, max_length: int = 1024, batch_size: int = 16) -> float:
    """Mean completion-token loss of ``model`` on a JSONL file (adapter or base)."""
    examples = load_examples(tokenizer, path, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch)["loss"]) * n
        count += n
    return total / count
