"""The bundled demo and the examples, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo"
TASKS = ["sort", "reverse", "upper", "count"]


def run(args: list[str], timeout: int = 900) -> str:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_committed_demo_is_complete_and_small():
    from transformers import AutoConfig

    from vllm_iapt.adapter import load_adapter

    cfg = AutoConfig.from_pretrained(DEMO / "model")
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM CPU attention needs head_dim 64
    for task in TASKS:
        a = load_adapter(DEMO / "adapters" / task, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers)
        assert a.config.peft_type == "IAPT"
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 25 * 2**20, f"the demo is {size / 2**20:.1f} MiB"


@pytest.mark.engine
def test_offline_batch_example():
    out = run([str(ROOT / "examples" / "offline_batch.py")])
    rows = [[c.strip() for c in line.split("|")] for line in out.splitlines() if line.count("|") == 2]
    got = {(r[0], r[1]): r[2] for r in rows}
    assert got[("sort", "c a b =>")] == "' a b c'"
    assert got[("reverse", "c a b =>")] == "' b a c'"
    assert got[("upper", "c a b =>")] == "' C A B'"
    assert got[("count", "h e f g a =>")] == "' 5'"
    assert ("base", "c a b =>") in got


def test_training_example(tmp_path):
    out = run([str(ROOT / "examples" / "train_adapter.py"), "--output-dir", str(tmp_path / "ad"), "--max-steps", "20"])
    assert "vllm_iapt.cli train" in out
    assert out.count("(want ") == 5
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()


@pytest.mark.server
def test_main_command_serves_the_demo(tmp_path):
    """The README's main command (scripts/demo.sh) serves every tenant; the
    OpenAI-client example and the evaluation command run against it: a held-out
    sample through the offline engine reaches the model card's accuracy, and the
    server's answers agree with the offline engine's. (One evaluation run checks
    both: each engine start-up costs about 40 s of imports on this machine.)"""
    from vllm_iapt.serving.process import ServerProcess

    cmd = lambda port: [str(ROOT / "scripts" / "demo.sh"), "--port", str(port)]  # noqa: E731
    with ServerProcess(cmd, tmp_path / "demo.log") as srv:
        out = run([str(ROOT / "examples" / "openai_client.py"), "--base-url", srv.url + "/v1"])
        assert "models: demo, sort, reverse, upper, count" in out
        rows = {line.split("|")[0].strip(): line.split("|")[2].strip() for line in out.splitlines() if "|" in line}
        assert rows["sort"] == "' a b c'" and rows["upper"] == "' C A B'" and rows["count"] == "' 3'"
        out = tmp_path / "eval.json"
        table = run([str(DEMO / "evaluate.py"), "--server-url", srv.url + "/v1", "--limit", "25", "--json", str(out)])
        assert "offline engine and server agree" in table
    card = json.loads((DEMO / "results.json").read_text())
    got = json.loads(out.read_text())["offline engine"]
    for task in TASKS:
        # This run's sample (25 held-out examples) against the card's documented figure.
        documented = card["adapters"][task]["accuracy"]
        assert got[task][task] >= min(0.9, documented - 0.08), (task, got[task][task], documented)
    # The base model given the same untagged prompts cannot do the tasks.
    assert sum(got["base"].values()) / len(TASKS) < 0.5, got["base"]
