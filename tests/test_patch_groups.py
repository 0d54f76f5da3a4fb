"""Patches by process (patches/__init__.py): which processes apply which group, the one
table of patched vLLM symbols against the wrappers really installed, and vLLM's
production process layout, where the worker never imports the OpenAI server and a
patch that fails in the engine core is refused there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import random_ids

PATCHES_DIR = Path(__file__).resolve().parent.parent / "patches"


def test_vllm_engine_and_worker_processes_are_never_front_ends():
    from vllm_iapt import patches

    for name in ("EngineCore", "EngineCore_DP1", "VllmWorker-0", "VllmWorker-3"):
        assert patches.is_engine_process(name), name
    for name in ("MainProcess", "ApiServer_0", "SpawnProcess-1"):
        assert not patches.is_engine_process(name), name


def _resolve(dotted: str):
    """The object at ``a.b.C.attr`` (longest importable module prefix, then attributes)."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _defining_file(obj) -> str:
    fn = getattr(obj, "__func__", obj)  # classmethods are bound methods
    return fn.__code__.co_filename


def test_the_table_lists_every_wrapper_once():
    """Every row's symbol is wrapped by the module the row names (checked on the
    installed function, ``functools.wraps`` or not), no symbol is listed or wrapped
    twice, and every module of every group has its rows."""
    from vllm_iapt import patches
    from vllm_iapt.engine import plugin

    plugin.register()  # the role hooks
    for group in patches.PATCH_GROUPS:
        patches.apply_group(group)
    assert not patches.FAILED, patches.FAILED
    symbols = [row.symbol for row in patches.PATCHED_SYMBOLS]
    assert len(symbols) == len(set(symbols)), "a symbol is listed twice"
    group_of = {m: g for g, modules in patches.PATCH_GROUPS.items() for m in modules}
    group_of["__init__"] = patches.EVERY_PROCESS  # the role hooks
    for row in patches.PATCHED_SYMBOLS:
        assert group_of.get(row.module) == row.group, row
        assert row.why and row.goes_away_when and row.upstream, row
        installed = _resolve(row.symbol)
        if row.symbol.endswith(".iapt"):  # an attribute the patch adds, where IAPT's state lives
            assert installed is None and f"{row.symbol.split('.')[-2]}.iapt = None" in (
                PATCHES_DIR / f"{row.module}.py").read_text(), row
            continue
        assert Path(_defining_file(installed)) == PATCHES_DIR / f"{row.module}.py", (row.symbol, _defining_file(installed))
        fn = getattr(installed, "__func__", installed)
        inner = [c.cell_contents for c in fn.__closure__ or () if callable(getattr(c, "cell_contents", None))]
        wrapped_twice = [f for f in inner if getattr(f, "__name__", None) == fn.__name__
                         and Path(_defining_file(f)).parent == PATCHES_DIR]
        assert not wrapped_twice, f"{row.symbol} is wrapped twice"
    assert {row.module for row in patches.PATCHED_SYMBOLS} == set(group_of)
    # Every wrapper a patch module installs is a row (each `X.attr = name` of its apply()).
    import re

    for module in set(group_of) - {"__init__"}:
        source = (PATCHES_DIR / f"{module}.py").read_text()
        body = source[source.index("def apply()"):]
        assigned = {f"{cls}.{attr}" for cls, attr in re.findall(r"^    (\w+)\.(\w+) = ", body, re.M)}
        listed = {".".join(row.symbol.split(".")[-2:]) for row in patches.PATCHED_SYMBOLS if row.module == module}
        assert assigned <= listed, (module, assigned - listed)


def test_a_registered_module_that_is_missing_is_named(monkeypatch):
    from vllm_iapt import patches

    monkeypatch.setattr(patches, "FAILED", {})
    monkeypatch.setattr(patches, "APPLIED", set(patches.APPLIED))
    monkeypatch.setitem(patches.PATCH_GROUPS, "test-group", ("no_such_patch",))
    patches.apply_group("test-group")
    assert "patches/no_such_patch.py is registered in the 'test-group' group" in patches.FAILED["no_such_patch"]
    with pytest.raises(patches.PatchError, match="no_such_patch"):
        patches.check_patches()


PROBE = textwrap.dedent('''
    import json, multiprocessing, sys

    def _modules(group):
        """The vLLM modules whose symbols the group's patches change, and the patch modules."""
        from vllm_iapt import patches
        out = {"vllm_iapt.patches." + m for m in patches.PATCH_GROUPS[group]}
        for row in patches.PATCHED_SYMBOLS:
            if row.group == group:
                parts = row.symbol.split(".")
                out.add(".".join(p for p in parts[:next(i for i, p in enumerate(parts) if p.lstrip("_")[:1].isupper())]))
        return out

    def probe(worker=None):
        from vllm_iapt import patches
        # (vLLM's worker imports the renderer module, vllm.renderers.base, by itself.)
        front_end = (_modules("frontend") | {"vllm.entrypoints.openai.api_server", "vllm_iapt.serving.models"}) - {
            "vllm.renderers.base"}
        worker_side = _modules("worker") | {"vllm_iapt.engine.worker"}
        return {"process": multiprocessing.current_process().name, "groups": sorted(patches.APPLIED),
                "failed": sorted(patches.FAILED),
                "front_end_modules": sorted(front_end & set(sys.modules)),
                "worker_modules": sorted(worker_side & set(sys.modules))}

    if __name__ == "__main__":
        spec = json.load(open(sys.argv[1]))
        from vllm import LLM, SamplingParams
        from vllm_iapt import IAPTRequest

        llm = LLM(model=spec["model"], enforce_eager=True, dtype="float32", max_model_len=256,
                  distributed_executor_backend="mp", additional_config={"iapt": {"snapshot_dir": spec["snaps"]}})
        out = llm.generate([{"prompt_token_ids": spec["ids"]}],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                           lora_request=IAPTRequest("a", 1, spec["adapter"]), use_tqdm=False)
        print("RESULT " + json.dumps({"front": probe(), "workers": llm.collective_rpc(probe),
                                      "tokens": list(out[0].outputs[0].token_ids)}), flush=True)
''')


def _run_script(tmp_path, spec: dict, extra_env: dict | None = None):
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
                "VLLM_LOGGING_LEVEL": "DEBUG", **(extra_env or {})})
    return subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


@pytest.mark.engine
def test_each_process_applies_only_its_groups(tmp_path, tiny_model_dir, adapter_factory, reference):
    """vLLM's production layout (front end, engine core, worker in three processes):
    the worker never imports the OpenAI server's serving layer or a front-end patch
    (before the grouping it applied ``serving`` and imported both), the front end never
    imports the model runner or a worker patch, the engine core applies only its own
    group, and IAPT answers as the reference does."""
    adapter = adapter_factory("groups-a", seed=3)
    snaps = tmp_path / "snaps"
    snaps.mkdir(mode=0o700)
    ids = random_ids(20, 4)
    proc = _run_script(tmp_path, {"model": str(tiny_model_dir), "adapter": str(adapter), "snaps": str(snaps),
                                  "ids": ids})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    front, (worker,) = result["front"], result["workers"]
    assert front["groups"] == ["every process", "frontend"] and not front["failed"], front
    assert front["worker_modules"] == [], front
    assert worker["process"].startswith("VllmWorker"), worker
    assert worker["groups"] == ["every process", "worker"] and not worker["failed"], worker
    assert worker["front_end_modules"] == [], worker
    log = (proc.stdout + proc.stderr).splitlines()  # vLLM logs to stdout; the engine core's lines say so
    core = [line for line in log if "vllm-iapt:" in line and "patches applied in process EngineCore" in line]
    assert any("engine_core patches applied" in line for line in core), proc.stdout[-5000:]
    assert not any("frontend patches applied" in line or "worker patches applied" in line for line in core), core
    assert result["tokens"] == reference.generate(ids, adapter, 8).token_ids


BREAK_SCHEDULER = '''
import importlib.abc, sys

class _Breaker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm_iapt.patches.scheduler":
            raise ImportError("simulated: vLLM moved the scheduler")
        return None

sys.meta_path.insert(0, _Breaker())
'''


@pytest.mark.engine
def test_an_engine_core_patch_that_fails_refuses_iapt_in_the_engine_core(tmp_path, tiny_model_dir, adapter_factory):
    """The front end does not apply the engine core's patches, so it cannot see them
    fail: the engine core refuses IAPT itself when its role starts, naming the patch."""
    (tmp_path / "breaker").mkdir()
    (tmp_path / "breaker" / "sitecustomize.py").write_text(BREAK_SCHEDULER)
    snaps = tmp_path / "snaps"
    snaps.mkdir(mode=0o700)
    proc = _run_script(tmp_path, {"model": str(tiny_model_dir), "adapter": str(adapter_factory("groups-b", seed=4)),
                                  "snaps": str(snaps), "ids": random_ids(10, 5)},
                       {"PYTHONPATH": str(tmp_path / "breaker")})
    assert proc.returncode != 0
    refused = [line for line in (proc.stdout + proc.stderr).splitlines() if "PatchError" in line and "scheduler" in line]
    assert refused and "vLLM 0.32.0" in refused[-1] and "EngineCore" in refused[-1], proc.stderr[-5000:]
