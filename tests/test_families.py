"""Every checked model family, through the real engine (eager), token for token
against the reference model: a mixed batch of the base model and two adapters,
prompt lengths 1..200 (longer than Gemma3's 32-token sliding window). One engine
per family, one after another in one process. The compiled path runs the same
soft-row op in every family; tests/test_engine.py checks it compiled on Llama."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import random_ids
from test_engine_process import run_engine

from vllm_iapt.architectures import CHECKED_ARCHITECTURES
from vllm_iapt.toy import FAMILIES, build_checkpoint

pytestmark = pytest.mark.engine

MAX_TOKENS = 8
LENGTHS = (1, 7, 33, 120, 200)
SAMPLING = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": 0, "ignore_eos": True}


def test_every_checked_architecture_has_a_family_test():
    assert {arch for _, arch, _ in FAMILIES.values()} == set(CHECKED_ARCHITECTURES)


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tiny_model_dir, adapter_factory):
    """Per family: its base model, adapters, items and the engine's results."""
    root = tmp_path_factory.mktemp("families")
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    cases, runs = {}, []
    for family in FAMILIES:
        model_dir = root / family
        model_dir.mkdir()
        for f in tiny_model_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, model_dir / f.name)
        base = build_checkpoint(family, model_dir, vocab, seed=len(family)).eval()
        a = [f"{family}-a", 1, str(adapter_factory(f"{family}-a", num_hidden_layers=3, num_soft_tokens=4, seed=41))]
        b = [f"{family}-b", 2, str(adapter_factory(f"{family}-b", num_hidden_layers=3, num_soft_tokens=2,
                                                    activation="gelu", layers=[0, 2], seed=42))]
        items = [{"ids": random_ids(n, 1000 + 10 * n + i), "adapter": ad}
                 for n in LENGTHS for i, ad in enumerate((None, a, b))]
        cases[family] = (base, (a, b), items)
        runs.append({"model": str(model_dir), "engine": {"additional_config": {"iapt": {}}, "max_model_len": 256},
                     "inspect_layers": True, "batches": [{"items": items, "sampling": SAMPLING}]})
    result = run_engine(root, {"process_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, "runs": runs}, timeout=1800)
    return {family: (*cases[family], res) for family, res in zip(FAMILIES, result["runs"])}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_parity(family, family_runs):
    from vllm_iapt.reference import IAPTForCausalLM

    base, adapters, items, result = family_runs[family]
    assert "startup_error" not in result, result
    assert base.config.architectures[0] in CHECKED_ARCHITECTURES
    assert all(t.startswith("IAPT") for t in result["layer_types"]), result["layer_types"]
    refs = {None: IAPTForCausalLM.from_pretrained(base)}
    for ad in adapters:
        refs[ad[0]] = IAPTForCausalLM.from_pretrained(base, ad[2])
    outputs = set()
    for it, res in zip(items, result["batches"][0]):
        ref = refs[it["adapter"][0] if it["adapter"] else None].generate(it["ids"], MAX_TOKENS)
        got = res["outputs"][0]
        assert got["token_ids"] == ref.token_ids, (family, it["adapter"] and it["adapter"][0], len(it["ids"]))
        for x, y in zip(got["logprobs"], ref.logprobs):
            assert math.isclose(x, y, abs_tol=2e-3), (family, x, y)
        outputs.add((len(it["ids"]), tuple(got["token_ids"])))
    # The adapters change the outputs (otherwise parity would prove little).
    assert len(outputs) > 2 * len(LENGTHS)
