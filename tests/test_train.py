"""The trainer learns, resumes, and its CLI writes a valid adapter."""

import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_iapt.adapter import load_adapter
from vllm_iapt.reference import IAPTForCausalLM
from vllm_iapt.train import TrainConfig, train
from vllm_iapt.train.trainer import build_model, evaluate_loss, parameter_groups

LETTERS = "abcdefgh"


def write_copy_task(path, n, seed):
    """Completion = the prompt's first word repeated: instance-dependent, and a
    random base model cannot do it."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(2, 5))]
            f.write(json.dumps({"prompt": " ".join(words), "completion": f" {words[0]} {words[0]}"}) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_copy_task(d / "train.jsonl", 256, 0)
    write_copy_task(d / "eval.jsonl", 64, 1)
    return d


def config(tiny_model_dir, data, out, **kw):
    base = dict(base_model=str(tiny_model_dir), data=str(data / "train.jsonl"), eval_data=str(data / "eval.jsonl"),
                output_dir=str(out), num_soft_tokens=4, bottleneck_dim=32, learning_rate=5e-3, num_epochs=6,
                batch_size=16, eval_steps=20, save_steps=40, logging_steps=20, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_beats_the_base_model(tiny_model_dir, data, tmp_path):
    metrics = train(config(tiny_model_dir, data, tmp_path / "ad"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_loss = evaluate_loss(IAPTForCausalLM(base), tok, str(data / "eval.jsonl"))
    tuned = IAPTForCausalLM.from_pretrained(base, tmp_path / "ad")
    tuned_loss = evaluate_loss(tuned, tok, str(data / "eval.jsonl"))
    print(f"held-out loss: base {base_loss:.3f}, adapter {tuned_loss:.3f}, trainer eval {metrics['eval_loss']:.3f}")
    assert tuned_loss < 0.25 * base_loss
    assert abs(metrics["eval_loss"] - tuned_loss) < 0.05  # the trainer's eval is the same loss
    # The saved adapter is in the format of docs/iapt.md, section 6, and loads with validation.
    a = load_adapter(tmp_path / "ad", hidden_size=128, num_hidden_layers=2)
    assert a.config.bottleneck_dim == 32 and a.config.activation == "rational"


def test_defaults_start_at_the_sink_and_share_one_learning_rate(tiny_model_dir, data, tmp_path):
    """The defaults (docs/iapt.md section 8): first-token initialisation, and the
    rational coefficients at the learning rate unless given their own."""
    cfg = config(tiny_model_dir, data, tmp_path / "ad")
    assert cfg.init == "first_token" and cfg.rational_learning_rate is None
    model = build_model(cfg)
    rates = sorted(g["lr"] for g in parameter_groups(model, cfg))
    assert rates == [cfg.learning_rate] * 2
    own = cfg.model_copy(update={"rational_learning_rate": 1e-2})
    groups = parameter_groups(model, own)
    assert [g["lr"] for g in groups] == [cfg.learning_rate, 1e-2]
    assert sum(p.numel() for p in groups[1]["params"]) == sum(
        g.numerator.numel() + g.denominator.numel() for g in model.generators.values())


def test_resume_continues_from_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    """A run cut after its step-20 checkpoint and resumed loads that checkpoint and
    ends with exactly the weights of the same run done in one go: weights,
    optimizer, schedule, data order and RNG state all come back."""
    import shutil

    from vllm_iapt.train import trainer as trainer_module

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    kw = dict(max_steps=40, save_steps=20, eval_steps=1000, num_epochs=1)
    train(config(tiny_model_dir, data, straight, **kw))
    train(config(tiny_model_dir, data, cut, **kw))
    shutil.rmtree(cut / "checkpoints" / "checkpoint-40")  # the run "died" after step 20's checkpoint
    (cut / "adapter_model.safetensors").unlink()
    loaded = []
    cls = trainer_module.IAPTTrainer
    original = cls._load_from_checkpoint
    monkeypatch.setattr(cls, "_load_from_checkpoint",
                        lambda self, path, model=None: (loaded.append(path), original(self, path, model))[1])
    train(config(tiny_model_dir, data, cut, resume=True, **kw))
    assert [p.rsplit("/", 1)[-1] for p in loaded] == ["checkpoint-20"]
    state = json.loads((cut / "checkpoints" / "checkpoint-40" / "trainer_state.json").read_text())
    assert state["global_step"] == 40 and state["log_history"][0]["step"] <= 20  # history carried over
    a, b = load_adapter(straight).tensors, load_adapter(cut).tensors
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_chat_messages_bf16_and_cli(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}]}
            for w in ["alpha", "beta", "gamma", "delta"] * 8]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "chat-ad"
    cmd = [sys.executable, "-m", "vllm_iapt.cli", "train", "--base-model", str(tiny_model_dir),
           "--data", str(tmp_path / "chat.jsonl"), "--output-dir", str(out), "--max-steps", "4",
           "--batch-size", "4", "--precision", "bfloat16", "--save-dtype", "bfloat16", "--activation", "silu",
           "--layers", "0", "1", "--bottleneck-dim", "8", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_adapter(out)
    assert a.config.torch_dtype == "bfloat16" and a.config.activation == "silu"
    assert all(t.dtype == torch.bfloat16 for t in a.tensors.values())
    assert "adapter written to" in proc.stdout
    assert "eval_loss" in json.loads((out / "train_metrics.json").read_text())


def test_cli_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vllm_iapt.cli", "train", "--base-model", str(tmp_path / "none"),
                           "--data", "x.jsonl", "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr
