"""Scale-out layouts through a real `vllm serve` (docs/scaling.md): data-parallel
engines behind one API server, pipeline-parallel stages, data parallelism across two
"nodes" (a second `vllm serve --headless` with its own TMPDIR, as a second machine
has its own /tmp), and what adapter-aware routers read (`vllm:lora_requests_info`).

Every rank of a layout is bound to this test worker's core
(``VLLM_CPU_OMP_THREADS_BIND``), so a layout costs processes, not cores. Outputs are
compared token for token with the reference model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import random_ids
from test_server import BASE, GREEDY, serve_command
from vllm_iapt.serving.process import ServerProcess, free_port, vllm_serve
from vllm_iapt.toy import random_adapter

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

VLLM = str(Path(sys.executable).with_name("vllm"))


def bind(ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` putting ``ranks`` ranks on this worker's first core."""
    core = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    return "|".join([str(core)] * ranks)


@contextmanager
def every_core():
    """Processes started inside may use every core (tests pinned to one core by
    conftest). For ranks that talk through vLLM's CPU shared-memory channel, which
    spins while it waits: two of them on one core take turns at spinning."""
    if not hasattr(os, "sched_setaffinity"):
        yield "|".join(["0", "0"])
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        cores = sorted(os.sched_getaffinity(0))
        yield "|".join(str(c) for c in (cores * 2)[:2])
    finally:
        os.sched_setaffinity(0, mine)


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask_all(url: str, jobs: list[tuple[str, list[int]]], max_tokens: int = 6) -> list[list[int]]:
    """Sends every (model, ids) at once, each on its own connection; the token ids."""
    def one(job):
        with client(url) as c:
            res = c.completions.create(model=job[0], prompt=job[1], max_tokens=max_tokens, **GREEDY)
            assert res.model == job[0]
            return res.choices[0].token_ids

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def assert_parity(reference, paths: dict, jobs, outputs, max_tokens: int = 6) -> None:
    for (model, ids), tokens in zip(jobs, outputs):
        assert tokens == reference.generate(ids, paths[model], max_tokens).token_ids, (model, len(ids))


def metric_samples(url: str, name: str) -> list:
    text = httpx.get(url + "/metrics", timeout=60).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def successes_by_engine(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in metric_samples(url, "vllm:request_success_total"):
        out[s.labels["engine"]] = out.get(s.labels["engine"], 0.0) + s.value
    return out


def adapter_jobs(models: list[str], count: int, seed: int) -> list[tuple[str, list[int]]]:
    return [(models[i % len(models)], random_ids(5 + (i * 7) % 40, seed + i)) for i in range(count)]


# -- data parallel, one node ---------------------------------------------------------


def test_data_parallel_serves_every_adapter_from_every_engine(tiny_model_dir, adapter_factory, tmp_path, reference):
    """`--data-parallel-size 2` with run-time loading: one API server (vLLM would
    default to two and then refuse run-time loading); start-up, run-time loaded and
    resolver-found adapters are answered exactly, with both engines answering adapter
    requests (vLLM's per-engine success counts); the same prompt for every tenant
    stays apart in each engine's prefix cache; an unload reaches every engine (the
    name is gone); routers see the adapters in `vllm:lora_requests_info`."""
    sort = adapter_factory("dp-sort", num_soft_tokens=4, seed=91)
    root = tmp_path / "adapters"
    random_adapter(root / "late", hidden_size=128, num_hidden_layers=2, num_soft_tokens=3, seed=92)
    random_adapter(root / "found", hidden_size=128, num_hidden_layers=2, layers=[0], seed=93)
    log = tmp_path / "server.log"
    cmd = lambda port: serve_command(  # noqa: E731
        tiny_model_dir, port, "--enable-iapt", "--iapt-modules", f"sort={sort}", "--iapt-adapter-dir", str(root),
        "--data-parallel-size", "2", "--data-parallel-rpc-port", str(free_port()))
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_OMP_THREADS_BIND": bind(2)}
    # "loaded" is a name given at load time (the resolver would not find it: no <dir>/loaded).
    paths = {BASE: None, "sort": str(sort), "loaded": str(root / "late"), "found": str(root / "found")}
    with ServerProcess(cmd, log, env) as srv:
        assert httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "loaded", "lora_path": "late"},
                          timeout=120).status_code == 200
        for round_ in range(3):  # adapter requests only: each engine's success count must grow
            before = successes_by_engine(srv.url)
            jobs = adapter_jobs(["sort", "loaded", "found"], 18, 1000 + 100 * round_)
            assert_parity(reference, paths, jobs, ask_all(srv.url, jobs))
            after = successes_by_engine(srv.url)
            grew = {e for e in after if after[e] > before.get(e, 0.0)}
            if grew == {"0", "1"}:
                break
        assert grew == {"0", "1"}, (before, after)
        mixed = adapter_jobs([BASE, "sort", "loaded", "found"], 16, 2000)
        assert_parity(reference, paths, mixed, ask_all(srv.url, mixed))
        # The same prompt for every model, twice: each engine's prefix cache keeps tenants apart.
        same = [(m, random_ids(40, 77)) for m in (BASE, "sort", "loaded", "found") for _ in range(2)]
        assert_parity(reference, paths, same, ask_all(srv.url, same))

        # What routers read while an adapter request runs: the gauge's series set
        # since it started (vLLM stamps each with the time it was set) name it.
        started = time.time()
        with client(srv.url) as c:
            stream = c.completions.create(model="found", prompt=random_ids(8, 5), max_tokens=480, stream=True,
                                          **GREEDY)
            next(iter(stream))
            infos = [s for s in metric_samples(srv.url, "vllm:lora_requests_info") if s.value >= started]
            for _ in stream:
                pass
        assert any("found" in s.labels["running_lora_adapters"].split(",") for s in infos), infos
        assert {s.labels["max_lora"] for s in infos} == {"8"}  # IAPT's device slots (max_adapters' default)
        models = {m["id"]: m for m in httpx.get(srv.url + "/v1/models", timeout=60).json()["data"]}
        assert {"sort", "loaded", "found"} <= set(models) and models["loaded"]["parent"] == BASE

        assert httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "loaded"},
                          timeout=120).status_code == 200
        with client(srv.url) as c:
            from openai import NotFoundError

            with pytest.raises(NotFoundError):
                c.completions.create(model="loaded", prompt=[1, 5, 6], max_tokens=2)
        text = log.read_text(errors="replace")
    assert "EngineCore_DP1" in text and "ApiServer_1" not in text


# -- pipeline parallel -----------------------------------------------------------------


@pytest.mark.all_cores
def test_pipeline_parallel_stages_write_their_own_layers(tiny_model_dir, adapter_factory, tmp_path, reference):
    """`--pipeline-parallel-size 2`, compiled (eager PP fails in vLLM 0.32's CPU build
    for the base model too): layer 0 on the first stage, layer 1 on the second.
    Adapters whose generators end on the first stage or span both (every adapter has
    one at layer 0, docs/iapt.md), mixed with base-model requests, match the
    reference. An adapter that fails to load on one stage only (injected:
    tests/rank_fault) fails its requests, also when the failing stage is not the one
    whose output reaches the scheduler; the other tenants go on."""
    paths = {BASE: None,
             "first": str(adapter_factory("pp-first", layers=[0], seed=101)),
             "both": str(adapter_factory("pp-both", num_soft_tokens=2, seed=102)),
             "both-gelu": str(adapter_factory("pp-both-gelu", activation="gelu", seed=103))}
    broken = {"bad0": str(adapter_factory("pp-bad0", seed=104)), "bad1": str(adapter_factory("pp-bad1", seed=105))}
    cmd = lambda port: vllm_serve(  # noqa: E731
        str(tiny_model_dir), "--served-model-name", BASE, "--dtype", "float32", "--max-model-len", "512",
        "--seed", "0", "--pipeline-parallel-size", "2", "--enable-iapt", "--iapt-modules",
        *[f"{name}={path}" for name, path in {**paths, **broken}.items() if path], port=port)
    # Compiled as vLLM's CPU platform compiles (Inductor): vLLM's CPU CI setting
    # (VLLM_CPU_CI_ENV, Dynamo's eager backend) skips the warm-up that allocates the
    # later stage's intermediate-tensor buffers, and so fails like --enforce-eager.
    env = {"VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).with_name("rank_fault")), os.environ.get("PYTHONPATH", "")]),
           "IAPT_TEST_FAIL_LOAD_ON_STAGE": "0:bad0,1:bad1"}
    with every_core() as cores, ServerProcess(cmd, tmp_path / "server.log",
                                              {**env, "VLLM_CPU_OMP_THREADS_BIND": cores}, timeout=900) as srv:
        jobs = adapter_jobs([BASE, "first", "both", "both-gelu"], 16, 3000)
        assert_parity(reference, paths, jobs, ask_all(srv.url, jobs, max_tokens=8), max_tokens=8)
        for name, stage in (("bad0", 0), ("bad1", 1)):
            mixed = [(name, random_ids(6, 60 + stage)), ("both", random_ids(9, 62)), (BASE, random_ids(7, 63))]
            with ThreadPoolExecutor(3) as pool:
                outcomes = list(pool.map(lambda job: _outcome(srv.url, job), mixed))
            # Stage 1's output reaches the scheduler: its own failure, or stage 0's by agreement.
            expected = "could not be loaded on another pipeline stage" if stage == 0 else \
                "injected load failure on pipeline stage 1"
            assert isinstance(outcomes[0], str) and expected in outcomes[0], outcomes[0]
            assert_parity(reference, paths, mixed[1:], outcomes[1:])
    text = (tmp_path / "server.log").read_text(errors="replace")
    assert text.count("IAPT: soft-row op in 1 decoder layers") == 2, text[-3000:]  # one layer per stage


def _outcome(url: str, job: tuple[str, list[int]]):
    """The token ids of a completion, or the error message it was answered with."""
    from openai import APIStatusError

    with client(url) as c:
        try:
            res = c.completions.create(model=job[0], prompt=job[1], max_tokens=6, **GREEDY)
        except APIStatusError as e:
            return str(e)
        return res.choices[0].token_ids


# -- data parallel across two "nodes" ----------------------------------------------------


def two_node_commands(model_dir, port: int, rpc_port: int, extra: list[str]) -> tuple[list[str], list[str]]:
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-address", "127.0.0.1",
          "--data-parallel-rpc-port", str(rpc_port)]
    # One API server: vLLM's default under --data-parallel-size 2 is two (IAPT asks for one
    # only with run-time loading), two more processes for nothing this test checks.
    head = serve_command(model_dir, port, *dp, "--api-server-count", "1", *extra)
    other = [VLLM, "serve", str(model_dir), "--served-model-name", BASE, "--dtype", "float32",
             "--max-model-len", "512", "--seed", "0", "--enforce-eager", "--headless",
             "--data-parallel-start-rank", "1", *dp, *extra]
    return head, other


@pytest.fixture
def node_tmp():
    """The second node's TMPDIR, short: vLLM puts ZMQ IPC sockets there, whose paths
    may not exceed 107 bytes (under pytest's basetemp the second node died)."""
    path = Path(tempfile.mkdtemp(prefix="iapt-node1-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_nodes_need_a_shared_snapshot_directory(tiny_model_dir, adapter_factory, tmp_path, reference, node_tmp):
    """Data parallel across two "nodes": the second node (`--headless`, its own TMPDIR)
    computes requests the first node's API server accepted. With the default snapshot
    directory (each node's own /tmp) the second node refuses to start and says what to set;
    with `--iapt-snapshot-dir` on storage both share, every answer is exact and both
    engines answer adapter requests."""
    sort = adapter_factory("node-sort", num_soft_tokens=4, seed=111)
    rev = adapter_factory("node-rev", num_soft_tokens=2, activation="gelu", seed=112)
    iapt = ["--enable-iapt", "--iapt-modules", f"sort={sort}", f"rev={rev}"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": bind(1)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)

    # The second node refuses (the head's `vllm serve` refuses the same way, through the
    # engine-args check that test_engine_process's across-nodes test runs in process).
    _, other = two_node_commands(tiny_model_dir, free_port(), free_port(), iapt)
    refused = subprocess.run(other, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                             env={**env, "TMPDIR": str(node_tmp)})
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert "Set --iapt-snapshot-dir" in refused.stdout and "storage every node shares" in refused.stdout, \
        refused.stdout[-3000:]

    shared = tmp_path / "shared-snapshots"
    rpc_port, extra = free_port(), iapt + ["--iapt-snapshot-dir", str(shared)]
    _, other = two_node_commands(tiny_model_dir, 0, rpc_port, extra)
    node1_log = tmp_path / "node1.log"
    with open(node1_log, "wb") as log:
        node1 = subprocess.Popen(other, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**env, "TMPDIR": str(node_tmp)})
    head = ServerProcess(lambda port: two_node_commands(tiny_model_dir, port, rpc_port, extra)[0],
                         tmp_path / "node0.log", {"VLLM_CPU_OMP_THREADS_BIND": bind(1)}, timeout=600)
    stop_head_if_node1_dies(node1, head, node1_log)
    try:
        with head as srv:
            paths = {BASE: None, "sort": str(sort), "rev": str(rev)}
            for round_ in range(3):
                before = successes_by_engine(srv.url)
                jobs = adapter_jobs(["sort", "rev"], 12, 4000 + 100 * round_)
                assert_parity(reference, paths, jobs, ask_all(srv.url, jobs))
                after = successes_by_engine(srv.url)
                if {e for e in after if after[e] > before.get(e, 0.0)} == {"0", "1"}:
                    break
            assert {e for e in after if after[e] > before.get(e, 0.0)} == {"0", "1"}, (before, after)
            mixed = adapter_jobs([BASE, "sort", "rev"], 12, 5000)
            assert_parity(reference, paths, mixed, ask_all(srv.url, mixed))
    finally:
        os.killpg(node1.pid, 15)
        try:
            node1.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node1.pid, 9)
            node1.wait()
    assert not any(node_tmp.glob("vllm-iapt-snapshots-*")), "the second node wrote snapshots to its own /tmp"


def stop_head_if_node1_dies(node1: subprocess.Popen, head: ServerProcess, log: Path) -> None:
    """The head node waits for the second node's engine without end: if that node
    exits, stop the head, so that the test fails at once with both logs."""
    def watch():
        node1.wait()
        if head.proc is not None and head.proc.poll() is None:
            print(f"second node exited with {node1.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            os.killpg(head.proc.pid, 15)

    threading.Thread(target=watch, daemon=True).start()
