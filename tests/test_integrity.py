"""Integrity: bounded and confined adapter reads, content-addressed snapshots, failures
that stay with their adapter, patches that never break plain vLLM, prefix-cache
keys by content. Unit tests first, then an in-process engine, then processes with a
deliberately broken patch module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import random_ids
from vllm_iapt.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_adapter, read_adapter
from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine.snapshots import MIN_IDLE_SECONDS
from vllm_iapt.toy import random_adapter

HARNESS = Path(__file__).with_name("engine_harness.py")
KW = {"hidden_size": 128, "num_hidden_layers": 2}


@pytest.fixture
def adapter(tmp_path):
    root = tmp_path / "root"
    random_adapter(root / "a", seed=5, **KW)
    return root / "a"


# -- bounded, confined reads ----------------------------------------------------


def test_config_read_is_bounded(adapter):
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps(cfg) + " " * (64 * 1024))
    with pytest.raises(AdapterError, match="adapter_config.json is .* bytes"):
        load_adapter(adapter)


def test_oversized_weights_refused_before_reading(adapter):
    size = (adapter / WEIGHTS_NAME).stat().st_size
    with open(adapter / WEIGHTS_NAME, "r+b") as f:
        f.truncate(size + 50 * 2**30)  # sparse: 50 GiB that must never be read
    t = time.monotonic()
    with pytest.raises(AdapterError, match="more than its config's tensors can take"):
        load_adapter(adapter)
    assert time.monotonic() - t < 5
    with open(adapter / WEIGHTS_NAME, "r+b") as f:
        f.truncate(size + 1)  # one byte too many (within the header allowance)
    with pytest.raises(AdapterError, match="more than its config's tensor shapes and its header imply"):
        load_adapter(adapter)


def test_special_files_refused(adapter):
    (adapter / WEIGHTS_NAME).unlink()
    os.mkfifo(adapter / WEIGHTS_NAME)  # would block a plain open()
    with pytest.raises(AdapterError, match="not a regular file"):
        load_adapter(adapter)


def test_symlinks_confined_to_the_root_at_read_time(adapter, tmp_path):
    root = adapter.parent
    assert load_adapter(adapter, root=root).content_hash
    outside = tmp_path / "outside"
    random_adapter(outside, seed=6, **KW)
    # A weights file re-linked to outside the root after it was accepted.
    (adapter / WEIGHTS_NAME).unlink()
    os.symlink(outside / WEIGHTS_NAME, adapter / WEIGHTS_NAME)
    with pytest.raises(AdapterError, match="outside the adapter directory"):
        load_adapter(adapter, root=root)
    assert load_adapter(adapter).content_hash  # without a root (operator adapters) it may live anywhere
    # A symlink inside the root to a file inside the root is fine.
    (adapter / WEIGHTS_NAME).unlink()
    shutil.copy(outside / WEIGHTS_NAME, root / "w.safetensors")
    os.symlink(root / "w.safetensors", adapter / WEIGHTS_NAME)
    load_adapter(adapter, root=root)


# -- snapshots --------------------------------------------------------------------


def _store(tmp_path, max_bytes=1 << 30):
    from vllm_iapt.engine.snapshots import SnapshotStore

    return SnapshotStore(str(tmp_path / "snaps"), max_bytes)


def test_snapshot_is_content_addressed_and_reused(adapter, tmp_path):
    store = _store(tmp_path)
    a, raw = read_adapter(adapter)
    path = store.put(a, raw)
    assert Path(path).name == a.content_hash and Path(path).parent == Path(store.root)
    assert load_adapter(path, root=store.root).content_hash == a.content_hash  # the same bytes
    mtime = os.stat(Path(path) / WEIGHTS_NAME).st_mtime_ns
    assert store.put(a, raw) == path and os.stat(Path(path) / WEIGHTS_NAME).st_mtime_ns == mtime
    damaged = bytearray(raw)
    damaged[-1] ^= 0xFF
    (Path(path) / WEIGHTS_NAME).write_bytes(bytes(damaged))  # same size, other bytes: written again
    assert store.put(a, raw) == path and (Path(path) / WEIGHTS_NAME).read_bytes() == raw
    assert not [p for p in os.listdir(store.root) if p.startswith(".tmp")]
    shutil.copytree(adapter, tmp_path / "renamed")  # the same content elsewhere: the same snapshot
    b, raw_b = read_adapter(tmp_path / "renamed", name="other")
    assert store.put(b, raw_b) == path


def test_snapshot_directory_is_bounded(tmp_path):
    """Room is made from snapshots nobody needs: never those of requests in flight here
    or being accepted (held), nor one another server sharing the directory used within
    MIN_IDLE_SECONDS; an idle one of this process goes at once, however recent."""
    from vllm_iapt.engine.snapshots import SnapshotStore

    store = _store(tmp_path)
    other = SnapshotStore(store.root, store.max_bytes)  # a second server sharing the directory
    adapters = []
    for i in range(4):
        random_adapter(tmp_path / f"s{i}", seed=30 + i, **KW)
        adapters.append(read_adapter(tmp_path / f"s{i}"))
    one = len(adapters[0][1]) + 400
    store.max_bytes = 2 * one
    p0, p1 = store.put(*adapters[0]), store.put(*adapters[1])
    in_flight = {p0, p1}
    store.in_use = lambda: set(in_flight)
    with pytest.raises(AdapterError, match="snapshot directory is full.*requests in flight"):
        store.put(*adapters[2])
    in_flight.discard(p0)
    assert store.use_if_intact(p0, store.stamp(p0), hold=True)  # a request being accepted with p0
    with pytest.raises(AdapterError, match="snapshot directory is full"):
        store.put(*adapters[2])
    store.release(p0)
    p2 = store.put(*adapters[2])  # p0, idle now, goes at once
    assert not os.path.exists(p0) and os.path.exists(p1) and os.path.exists(p2)
    assert not store.use_if_intact(p0, (1, 2, 3))  # a caller that saw p0 intact earlier writes it again
    assert store.total_bytes() <= store.max_bytes
    other.touch(p2)  # another server accepted a request with p2: only time frees it
    in_flight.clear()
    p3 = store.put(*adapters[3])  # p1 (idle, last used here) makes room; p2 stays
    assert not os.path.exists(p1) and os.path.exists(p2) and os.path.exists(p3)
    in_flight.add(p3)
    with pytest.raises(AdapterError, match="snapshot directory is full"):
        store.put(*adapters[0])  # p3 is in flight here, p2 was used by the other server
    old = time.time() - MIN_IDLE_SECONDS - 1
    os.utime(p2, (old, old))  # the other server has not used p2 for MIN_IDLE_SECONDS
    assert store.put(*adapters[0]) == p0 and not os.path.exists(p2) and os.path.exists(p3)


def test_snapshot_directory_must_be_private(tmp_path):
    from vllm_iapt.engine.snapshots import SnapshotStore

    (tmp_path / "shared").mkdir()
    os.chmod(tmp_path / "shared", 0o777)
    with pytest.raises(ValueError, match="writable by other users"):
        SnapshotStore(str(tmp_path / "shared"), 1 << 20)


def test_catalog_snapshots_what_it_validated(adapter, tmp_path):
    from vllm_iapt.engine.frontend import AdapterCatalog, request_entry

    catalog = AdapterCatalog(128, 2, 32, _store(tmp_path))
    info = catalog.resolve("a", str(adapter))
    original = load_adapter(adapter).content_hash
    assert info.content_hash == original and Path(info.snapshot).name == original
    entry = request_entry(info)
    assert entry.path == info.snapshot and entry.source == str(adapter)
    # The user's files change: the next request validates the new content into a
    # new snapshot; the old snapshot still holds what the earlier request was accepted with.
    random_adapter(adapter, seed=99, **KW)
    info2 = catalog.resolve("a", str(adapter))
    assert info2.content_hash != original
    assert load_adapter(info.snapshot).content_hash == original
    # Deleted user files: the cached entry is not trusted; validation fails cleanly.
    shutil.rmtree(adapter)
    with pytest.raises(AdapterError, match="does not exist"):
        catalog.resolve("a", str(adapter))
    # A run-time adapter (confined) re-linked outside its root after it was loaded.
    root = tmp_path / "rt"
    random_adapter(root / "x", seed=7, **KW)
    catalog.confine(str(root / "x"), str(root))
    catalog.resolve("x", str(root / "x"))
    random_adapter(tmp_path / "evil", seed=8, **KW)
    (root / "x" / WEIGHTS_NAME).unlink()
    os.symlink(tmp_path / "evil" / WEIGHTS_NAME, root / "x" / WEIGHTS_NAME)
    with pytest.raises(AdapterError, match="outside the adapter directory"):
        catalog.resolve("x", str(root / "x"))


def test_worker_loads_only_snapshots_and_bounds_cpu_bytes(tmp_path):
    import torch

    from vllm_iapt.engine.adapter_manager import IAPTAdapterManager

    store = _store(tmp_path)
    snaps = []
    for i in range(3):
        random_adapter(tmp_path / f"w{i}", seed=40 + i, **KW)
        a, raw = read_adapter(tmp_path / f"w{i}")
        snaps.append((a, store.put(a, raw)))
    probe = IAPTAdapterManager(IAPTEngineConfig(snapshot_dir=str(tmp_path / "snaps")), torch.device("cpu"), 128, 2)
    size = probe._load_cpu(snaps[0][0].content_hash, "w0", snaps[0][1]).nbytes()  # packed float32, as kept
    cfg = IAPTEngineConfig(max_adapters=1, max_cpu_adapters=8, max_cpu_adapter_bytes=2 * size,
                           snapshot_dir=str(tmp_path / "snaps"))
    manager = IAPTAdapterManager(cfg, torch.device("cpu"), 128, 2)
    for a, path in snaps:
        manager.get(a.content_hash, a.name, path)
        manager.trim()
    assert manager.cpu_bytes() <= 2 * size and len(manager._cpu) == 2  # bounded in bytes, not only count
    a = snaps[0][0]
    with pytest.raises(AdapterError, match="is not a snapshot"):  # the user's directory is never read
        manager.get(a.content_hash, a.name, str(tmp_path / "w0"))
    shutil.copytree(snaps[1][1], tmp_path / "snaps" / ("0" * 64))
    with pytest.raises(AdapterError, match="does not hold the content that was accepted"):
        manager.get("0" * 64, "x", str(tmp_path / "snaps" / ("0" * 64)))
    manager.record_failures({"r1": "IAPT adapter 'x': gone"}, "h")
    assert manager.has_failures() and manager.take_failures() == {"r1": "IAPT adapter 'x': gone"}
    assert not manager.has_failures() and "h" in manager.failed_hashes


def test_patch_failure_refuses_iapt_naming_version(monkeypatch):
    from vllm_iapt import patches
    from vllm_iapt.engine import support

    monkeypatch.setitem(patches.FAILED, "beam_search", "ImportError: simulated")
    with pytest.raises(patches.PatchError, match=r"vLLM 0\.32\.0.*beam_search"):
        patches.check_patches()

    class Args:
        enable_lora = False

    with pytest.raises(patches.PatchError, match="beam_search"):
        support.prepare_engine_args(Args(), IAPTEngineConfig())
    monkeypatch.delitem(patches.FAILED, "beam_search")
    patches.check_patches()


def test_engine_args_patch_failure_still_refuses_iapt(monkeypatch, tiny_model_dir):
    """If ``engine_args`` itself cannot be applied, a minimal guard refuses IAPT."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_iapt import patches
    from vllm_iapt.engine import plugin

    plugin.register()  # the real patches first, so that what is restored below is the patched method
    monkeypatch.setattr(EngineArgs, "create_engine_config", EngineArgs.create_engine_config)  # restored after
    monkeypatch.setitem(patches.FAILED, "engine_args", "AttributeError: simulated")
    patches._fallback_guard()
    with pytest.raises(patches.PatchError, match="engine_args"):
        EngineArgs(model=str(tiny_model_dir), additional_config={"iapt": {}}).create_engine_config()


def test_cli_flags_for_the_bounds():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--enable-iapt", "--max-runtime-iapt-adapters", "5",
                              "--max-cpu-iapt-adapter-bytes", "1000", "--iapt-snapshot-dir", "/x/y",
                              "--iapt-max-snapshot-bytes", "2000"])
    iapt = AsyncEngineArgs.from_cli_args(args).additional_config["iapt"]
    assert iapt == {"max_runtime_adapters": 5, "max_cpu_adapter_bytes": 1000, "snapshot_dir": "/x/y",
                    "max_snapshot_bytes": 2000}
    # The folded options are on the namespace too: extra API servers (--api-server-count > 1)
    # build their engine args from it before the plugin's flags exist in their process.
    assert args.additional_config["iapt"] == iapt
    IAPTEngineConfig.model_validate(iapt)


# -- a patch module that cannot be imported ------------------------------------------

BREAKER = '''
import importlib.abc, sys

class _Breaker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm_iapt.patches.beam_search":
            raise ImportError("simulated: vLLM moved the beam search module")
        return None

sys.meta_path.insert(0, _Breaker())
'''


@pytest.fixture(scope="module")
def broken_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("breaker")
    (d / "sitecustomize.py").write_text(BREAKER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), str(HARNESS.parent)]),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _harness(tmp_path, spec, env):
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HARNESS), str(tmp_path / "spec.json")], capture_output=True,
                          text=True, timeout=600, env=env, cwd=HARNESS.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):]), proc.stderr


@pytest.mark.engine
def test_broken_patch_module_leaves_plain_vllm_working(tmp_path, tiny_model_dir, broken_env, reference):
    ids = random_ids(12, 3)
    spec = {"model": str(tiny_model_dir), "engine": {"enforce_eager": True},
            "batches": [{"items": [{"ids": ids}], "sampling": GREEDY}]}
    result, log = _harness(tmp_path, spec, broken_env)
    assert "batches" in result, result
    assert result["batches"][0][0]["outputs"][0]["token_ids"] == reference.generate(ids, None, 8).token_ids
    assert "could not patch vLLM" in log and "beam_search" in log
    # The CLI works too.
    vllm = str(Path(sys.executable).with_name("vllm"))
    out = subprocess.run([vllm, "serve", "--help=IAPT"], capture_output=True, text=True, timeout=300, env=broken_env)
    assert out.returncode == 0 and "--enable-iapt" in out.stdout, out.stderr[-3000:]


@pytest.mark.engine
def test_broken_patch_module_refuses_iapt(tmp_path, tiny_model_dir, broken_env):
    spec = {"model": str(tiny_model_dir), "engine": {"enforce_eager": True, "additional_config": {"iapt": {}}},
            "batches": []}
    result, _ = _harness(tmp_path, spec, broken_env)
    error = result["startup_error"]
    assert "PatchError" in error and "vLLM 0.32.0" in error and "beam_search" in error, error


# (the tests above run before the in-process engine below exists: two engines at once do not fit here)
# -- the in-process engine --------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model_dir, tmp_path_factory):
    from engine_harness import make_llm, shutdown

    snaps = tmp_path_factory.mktemp("engine-snapshots")
    os.chmod(snaps, 0o700)
    llm = make_llm(str(tiny_model_dir), enforce_eager=True,
                   additional_config={"iapt": {"snapshot_dir": str(snaps), "max_cpu_adapters": 8}})
    yield llm
    shutdown(llm)


GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def _run(llm, jobs, before_steps=None):
    from engine_harness import run_together

    return run_together(llm, jobs, GREEDY, before_steps)


def test_files_replaced_after_acceptance_do_not_change_the_answer(llm, reference, tmp_path):
    from vllm_iapt import IAPTRequest

    path = tmp_path / "tenant"
    random_adapter(path, seed=50, **KW)
    keep = tmp_path / "tenant-original"
    shutil.copytree(path, keep)
    prompt = random_ids(30, 1)
    outs = _run(llm, [(prompt, IAPTRequest("t", 1, str(path)))],
                before_steps=lambda: random_adapter(path, seed=51, **KW))  # retrained in place
    assert outs[0].outputs[0].token_ids == reference.generate(prompt, keep, 8).token_ids
    outs = _run(llm, [(prompt, IAPTRequest("t", 1, str(path)))])  # a new request sees the new files
    assert outs[0].outputs[0].token_ids == reference.generate(prompt, path, 8).token_ids


def test_worker_failure_fails_only_that_adapters_requests(llm, reference, tmp_path):
    from vllm_iapt import IAPTRequest

    good, bad = tmp_path / "good", tmp_path / "bad"
    random_adapter(good, seed=60, **KW)
    random_adapter(bad, seed=61, **KW)
    snapshot_root = Path(llm.llm_engine.vllm_config.additional_config["iapt"]["snapshot_dir"])
    bad_hash = load_adapter(bad).content_hash
    prompts = [random_ids(20 + i, 70 + i) for i in range(3)]
    jobs = [(p, IAPTRequest("bad", 2, str(bad))) for p in prompts] + [
        (p, IAPTRequest("good", 3, str(good))) for p in prompts] + [(p, None) for p in prompts]
    # The snapshot the worker would load disappears after the requests were accepted.
    outs = _run(llm, jobs, before_steps=lambda: shutil.rmtree(snapshot_root / bad_hash))
    for out in outs[:3]:
        assert out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids
        assert "IAPT adapter 'bad'" in str(out.outputs[0].stop_reason), out.outputs[0].stop_reason
    for out, (p, lora) in zip(outs[3:], jobs[3:]):
        ref = reference.generate(p, good if lora else None, 8).token_ids
        assert out.outputs[0].token_ids == ref and out.outputs[0].finish_reason == "length"
    # The engine is alive, and the next request of that adapter is served (snapshot written again).
    outs = _run(llm, [(prompts[0], IAPTRequest("bad", 2, str(bad)))])
    assert outs[0].outputs[0].token_ids == reference.generate(prompts[0], bad, 8).token_ids
    # A damaged snapshot (same size, other bytes) fails its requests the same way.
    random_adapter(tmp_path / "c", seed=62, **KW)
    c_hash = load_adapter(tmp_path / "c").content_hash

    def damage():
        w = snapshot_root / c_hash / WEIGHTS_NAME
        data = bytearray(w.read_bytes())
        data[-1] ^= 0xFF
        w.write_bytes(bytes(data))

    outs = _run(llm, [(prompts[1], IAPTRequest("c", 4, str(tmp_path / "c"))), (prompts[1], None)],
                before_steps=damage)
    assert outs[0].outputs[0].finish_reason == "error" and "does not hold the content" in outs[0].outputs[0].stop_reason
    assert outs[1].outputs[0].token_ids == reference.generate(prompts[1], None, 8).token_ids
    outs = _run(llm, [(prompts[1], IAPTRequest("c", 4, str(tmp_path / "c")))])  # the snapshot is written again
    assert outs[0].outputs[0].token_ids == reference.generate(prompts[1], tmp_path / "c", 8).token_ids


def test_prefix_cache_shared_by_content_not_name(llm, reference, tmp_path):
    from vllm_iapt import IAPTRequest

    random_adapter(tmp_path / "x", seed=80, **KW)
    shutil.copytree(tmp_path / "x", tmp_path / "x-copy")
    random_adapter(tmp_path / "y", seed=81, **KW)
    prompt = random_ids(200, 5)  # several KV blocks
    first = _run(llm, [(prompt, IAPTRequest("x", 5, str(tmp_path / "x")))])[0]
    same = _run(llm, [(prompt, IAPTRequest("x-alias", 6, str(tmp_path / "x-copy")))])[0]
    other = _run(llm, [(prompt, IAPTRequest("x", 5, str(tmp_path / "y")))])[0]
    assert first.num_cached_tokens == 0
    assert same.num_cached_tokens > 0, "the same content under another name and path must share blocks"
    assert other.num_cached_tokens == 0, "other content must never share blocks"
    assert same.outputs[0].token_ids == first.outputs[0].token_ids == reference.generate(prompt, tmp_path / "x", 8).token_ids
    assert other.outputs[0].token_ids == reference.generate(prompt, tmp_path / "y", 8).token_ids


def test_resolver_reads_bounded_and_confined(tmp_path):
    import asyncio

    from vllm_iapt.serving.models import IAPTDirectoryResolver

    root = tmp_path / "dir"
    random_adapter(root / "ok", seed=9, **KW)
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / CONFIG_NAME)  # would block a plain open()
    (root / "huge").mkdir()
    (root / "huge" / CONFIG_NAME).write_text('{"peft_type": "IAPT", "x": "' + "a" * 70000 + '"}')
    resolver = IAPTDirectoryResolver(str(root))

    async def resolve(name):
        return await asyncio.wait_for(resolver.resolve_lora("base", name), 30)

    assert asyncio.run(resolve("ok")).lora_path == str(root / "ok")
    assert asyncio.run(resolve("fifo")) is None
    assert asyncio.run(resolve("huge")) is None
