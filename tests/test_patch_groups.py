"""Patches by process (patches/__init__.py): which processes apply which group, the one
table of patched vLLM symbols against the wrappers really installed, and a patch that
fails in the engine core is refused there. (That each process of vLLM's production
layout applies only its own groups is checked on tests/test_engine_process.py's
multi-process engine.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


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


HARNESS = Path(__file__).with_name("engine_harness.py")


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
def test_an_engine_core_patch_that_fails_refuses_iapt_in_the_engine_core(tmp_path, tiny_model_dir):
    """The front end does not apply the engine core's patches, so it cannot see them
    fail: the engine core refuses IAPT itself when its role starts, naming the patch."""
    (tmp_path / "breaker").mkdir()
    (tmp_path / "breaker" / "sitecustomize.py").write_text(BREAK_SCHEDULER)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(tiny_model_dir), "engine": {"additional_config": {"iapt": {}}},
                                "batches": []}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "PYTHONPATH": str(tmp_path / "breaker")}
    proc = subprocess.run([sys.executable, str(HARNESS), str(spec)], capture_output=True, text=True, timeout=900,
                          env=env, cwd=HARNESS.parent)
    assert '"startup_error"' in proc.stdout, proc.stdout[-3000:]
    refused = [line for line in (proc.stdout + proc.stderr).splitlines() if "PatchError" in line and "scheduler" in line]
    assert refused and "vLLM 0.32.0" in refused[-1] and "EngineCore" in refused[-1], proc.stderr[-5000:]
