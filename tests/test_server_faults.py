"""Faults through a real `vllm serve --enable-iapt`, spoken to with the `openai` client.

One server (run-time loading, --api-key, a small run-time adapter limit, few
concurrent sequences (one) so that requests queue) is shared by the fault, key, limit
and metrics tests; a second one runs two API servers. Answers are compared token
for token with the transformers reference model, as in tests/test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import random_ids
from test_server import BASE, GREEDY, serve_command
from vllm_iapt.patches.shutdown import MESSAGE
from vllm_iapt.serving.process import ServerProcess
from vllm_iapt.toy import random_adapter

pytestmark = [pytest.mark.server, pytest.mark.timeout(1200)]

KEY = "test-secret-key"
KW = {"hidden_size": 128, "num_hidden_layers": 2}
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    def __init__(self, proc: ServerProcess, root: Path, originals: Path, snapshots: Path, sort: Path) -> None:
        self.proc, self.url, self.root, self.originals, self.snapshots, self.sort = (
            proc, proc.url, root, originals, snapshots, sort)

    def client(self, key: str | None = KEY, asynchronous: bool = False):
        from openai import AsyncOpenAI, OpenAI

        cls = AsyncOpenAI if asynchronous else OpenAI
        return cls(base_url=self.url + "/v1", api_key=key or "wrong", max_retries=0, timeout=600)

    def post(self, route: str, body: dict, key: str | None = KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + route, json=body, headers=headers, timeout=300)

    def load(self, name: str, path: str | None = None) -> httpx.Response:
        return self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path or name})

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", headers=AUTH, timeout=60).text

    def log_text(self) -> str:
        return self.proc.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_factory, tmp_path_factory):
    sort = adapter_factory("faults-sort", num_soft_tokens=4, seed=31)
    root = tmp_path_factory.mktemp("fault-adapters")
    originals = tmp_path_factory.mktemp("fault-originals")  # what each adapter was when loaded
    for i, name in enumerate(["rt1", "rt2", "rt3", "rt4"]):
        random_adapter(root / name, seed=40 + i, num_soft_tokens=2 + i, **KW)
        shutil.copytree(root / name, originals / name)
    for i in range(8):
        random_adapter(root / f"extra{i}", seed=60 + i, **KW)
    snapshots = tmp_path_factory.mktemp("fault-snapshots")
    os.chmod(snapshots, 0o700)
    log = tmp_path_factory.mktemp("fault-log") / "server.log"
    cmd = lambda port: serve_command(  # noqa: E731
        tiny_model_dir, port, "--enable-iapt", "--iapt-modules", f"sort={sort}", "--iapt-adapter-dir", str(root),
        "--max-runtime-iapt-adapters", "6", "--iapt-snapshot-dir", str(snapshots), "--api-key", KEY,
        "--max-num-seqs", "1", "--max-model-len", "2048", "--max-num-batched-tokens", "2048")
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with ServerProcess(cmd, log, env, api_key=KEY) as proc:
        yield Server(proc, root, originals, snapshots, sort)


def test_api_key_protects_iapt_routes(server, tmp_path):
    from openai import AuthenticationError

    for key in (None, "wrong"):
        assert server.post("/v1/load_lora_adapter", {"lora_name": "extra0", "lora_path": "extra0"},
                           key=key).status_code == 401
        assert server.post("/v1/unload_lora_adapter", {"lora_name": "sort"}, key=key).status_code == 401
        r = server.post("/v1/completions", {"model": "sort", "prompt": [1, 5, 6], "max_tokens": 2}, key=key)
        assert r.status_code == 401, r.text
        with pytest.raises(AuthenticationError):
            server.client(key).completions.create(model="sort", prompt=[1, 5, 6], max_tokens=2)
        with pytest.raises(AuthenticationError):  # the resolver is not reachable either
            server.client(key).completions.create(model="extra1", prompt=[1, 5, 6], max_tokens=2)
    assert "extra0" not in {m.id for m in server.client().models.list().data}
    assert server.load("extra0").status_code == 200
    assert server.client().completions.create(model="extra0", prompt=[1, 5, 6], max_tokens=2).model == "extra0"
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "extra0"}).status_code == 200


def _metric(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(r"^%s\{[^}]*\} (\S+)$" % re.escape(name), metrics, re.M))


def _in_engine_or_finished(metrics: str) -> float:
    """Requests the engine has accepted: waiting, running, or finished (any reason)."""
    return sum(_metric(metrics, n) for n in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                                              "vllm:request_success_total"))


def test_files_changed_while_requests_are_queued(server, reference):
    """rt1 retrained in place, rt2 deleted, rt3's weights re-linked outside the
    directory, rt4's snapshot deleted, all while requests of every tenant are
    queued behind long base-model requests that hold the single sequence slot.
    The engine survives; other tenants are unaffected; requests of a changed
    adapter are served with the content they were accepted with (rt1-rt3), or
    fail cleanly with a 500 naming the adapter (rt4, whose snapshot was removed)."""
    for name in ("rt1", "rt2", "rt3", "rt4"):
        r = server.load(name)
        assert r.status_code == 200, r.text
    client = server.client(asynchronous=True)
    # Other tenants first, then the adapters whose files change, rt4 last.
    jobs = [(model, random_ids(8 + 3 * i, 100 + 7 * i + k), 32) for i in range(3)
            for k, model in enumerate([BASE, "sort"])]
    jobs += [(model, random_ids(9 + 2 * i, 150 + 7 * i + k), 32) for i in range(3)
             for k, model in enumerate(["rt1", "rt2", "rt3"])]
    jobs += [("rt4", random_ids(10 + i, 200 + i), 32) for i in range(3)]
    paths = {BASE: None, "sort": server.sort, **{n: server.originals / n for n in ("rt1", "rt2", "rt3", "rt4")}}

    async def one(model, ids, max_tokens):
        try:
            res = await client.completions.create(model=model, prompt=ids, max_tokens=max_tokens, **GREEDY)
            return res.choices[0].token_ids
        except Exception as e:  # noqa: BLE001
            return e

    def apply_faults():
        random_adapter(server.root / "rt1", seed=99, num_soft_tokens=2, **KW)  # retrained in place
        shutil.rmtree(server.root / "rt2")  # deleted
        outside = server.root.parent / "outside-weights"
        random_adapter(outside, seed=98, num_soft_tokens=4, **KW)
        (server.root / "rt3" / "adapter_model.safetensors").unlink()  # re-linked outside the directory
        os.symlink(outside / "adapter_model.safetensors", server.root / "rt3" / "adapter_model.safetensors")
        snapshots = [p for p in server.snapshots.iterdir() if not p.name.startswith(".")]
        from vllm_iapt.adapter import load_adapter

        rt4 = load_adapter(server.originals / "rt4").content_hash
        assert rt4 in {p.name for p in snapshots}
        shutil.rmtree(server.snapshots / rt4)

    async def main():
        # Long base-model requests hold the single sequence slot, so that every job
        # below is still queued when the files change; they are aborted afterwards.
        finished_before = _in_engine_or_finished(await asyncio.to_thread(server.metrics))
        def blocker(i: int):
            return client.completions.create(model=BASE, prompt=random_ids(6, 900 + i), max_tokens=2000,
                                             stream=True, **GREEDY)

        first = await blocker(0)
        await first.__anext__()  # running: everything after it queues
        # The others are sent at once (a streaming call returns only once its request
        # runs, so awaiting them one by one would let them finish before the faults).
        blockers = [asyncio.create_task(blocker(i)) for i in range(1, 16)]  # ~30k tokens in all
        tasks = [asyncio.create_task(one(*job)) for job in jobs]
        started = time.monotonic()
        deadline = started + 300
        while (_in_engine_or_finished(await asyncio.to_thread(server.metrics)) - finished_before
               < len(jobs) + 1 + len(blockers)):
            assert time.monotonic() < deadline, "the requests were not all accepted"
            await asyncio.sleep(0.2)
        # Every request has been accepted (validated and added to the engine).
        print(f"all {len(jobs)} jobs accepted after {time.monotonic() - started:.1f}s; "
              f"{sum(t.done() for t in tasks)} done")
        await asyncio.to_thread(apply_faults)
        pending = {job[0] for job, task in zip(jobs, tasks) if not task.done()}
        await first.close()  # the client goes away: vLLM aborts the request
        for task in blockers:
            if task.done():
                await task.result().close()
            else:
                task.cancel()
        return pending, await asyncio.gather(*tasks)

    pending, results = asyncio.run(main())
    # The faults really hit adapters with requests still queued or running.
    assert {"rt1", "rt2", "rt3", "rt4"} <= pending, pending
    failed_rt4 = 0
    for (model, ids, max_tokens), got in zip(jobs, results):
        expected = reference.generate(ids, paths[model], max_tokens).token_ids
        if model == "rt4":  # accepted, then its snapshot was deleted before it ran
            failed_rt4 += 1
            assert getattr(got, "status_code", None) == 500 and "IAPT adapter 'rt4'" in str(got), got
            continue
        assert not isinstance(got, Exception), (model, got)
        assert got == expected, (model, len(ids))
    assert failed_rt4 == 3, "rt4's snapshot was removed before its requests ran; they must fail cleanly"

    sync = server.client()
    # The server is alive and every tenant keeps working.
    ids = random_ids(20, 5)
    for model in (BASE, "sort"):
        got = sync.completions.create(model=model, prompt=ids, max_tokens=8, **GREEDY).choices[0].token_ids
        assert got == reference.generate(ids, paths[model], 8).token_ids
    # New requests see the files as they are now.
    got = sync.completions.create(model="rt1", prompt=ids, max_tokens=8, **GREEDY).choices[0].token_ids
    assert got == reference.generate(ids, server.root / "rt1", 8).token_ids
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="does not exist"):
        sync.completions.create(model="rt2", prompt=ids, max_tokens=8)
    with pytest.raises(BadRequestError, match="outside the adapter directory"):
        sync.completions.create(model="rt3", prompt=ids, max_tokens=8)
    got = sync.completions.create(model="rt4", prompt=ids, max_tokens=8, **GREEDY).choices[0].token_ids
    assert got == reference.generate(ids, server.originals / "rt4", 8).token_ids  # snapshot written again
    assert "EngineDeadError" not in server.log_text() and server.proc.proc.poll() is None
    for name in ("rt1", "rt2", "rt3", "rt4"):
        assert server.post("/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200


def test_runtime_adapters_are_bounded(server):
    names = {m.id for m in server.client().models.list().data}
    for name in names - {BASE, "sort"}:
        server.post("/v1/unload_lora_adapter", {"lora_name": name})
    for i in range(6):
        assert server.load(f"extra{i}").status_code == 200
    r = server.load("extra6")  # explicit loads are never evicted: a clear 400
    assert r.status_code == 400 and "max_runtime_adapters=6" in r.json()["error"]["message"], r.text
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "extra5"}).status_code == 200
    client = server.client()
    assert client.completions.create(model="extra7", prompt=[1, 4], max_tokens=1).model == "extra7"  # resolver
    r = server.load("extra6")  # evicts the resolver-loaded extra7 (LRU)
    assert r.status_code == 200, r.text
    names = {m.id for m in client.models.list().data}
    assert "extra6" in names and "extra7" not in names
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="max_runtime_adapters"):  # full of explicit loads
        client.completions.create(model="extra7", prompt=[1, 4], max_tokens=1)
    assert "unregistered to make room for 'extra6'" in server.log_text()


def test_registry_churn_never_answers_404(server):
    """Issue 21: more resolver-found adapters in flight than the registry holds. A name
    resolved by a request's model check may be unregistered to make room for another
    before the request looks its adapter up; the request is served anyway."""
    from concurrent.futures import ThreadPoolExecutor

    client = server.client()
    for name in {m.id for m in client.models.list().data} - {BASE, "sort"}:
        server.post("/v1/unload_lora_adapter", {"lora_name": name})
    names = [f"extra{i % 8}" for i in range(48)]  # 8 adapters through a registry of 6
    evictions = server.log_text().count("unregistered to make room")

    def ask(name: str) -> str:
        return client.completions.create(model=name, prompt=[1, 4, 9], max_tokens=1).model

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(ask, names)) == names
    assert server.log_text().count("unregistered to make room") > evictions  # the registry did churn


def test_prompt_token_counters_exclude_soft_slots(server):
    def counter(text: str, name: str) -> float:
        return sum(float(v) for v in re.findall(r"^%s(?:\{[^}]*\})? (\S+)$" % re.escape(name), text, re.M))

    before = server.metrics()
    ids = random_ids(37, 9)
    server.client().completions.create(model="sort", prompt=ids, max_tokens=2)  # 4 soft tokens
    after = server.metrics()
    assert counter(after, "vllm:prompt_tokens_total") - counter(before, "vllm:prompt_tokens_total") == len(ids)
    hist = "vllm:request_prompt_tokens_sum"
    assert counter(after, hist) - counter(before, hist) == len(ids)


# -- two API servers ---------------------------------------------------------------


def test_two_api_servers_serve_every_adapter(tiny_model_dir, adapter_factory, tmp_path, reference):
    from openai import OpenAI

    sort = adapter_factory("two-sort", num_soft_tokens=4, seed=71)
    reverse = adapter_factory("two-reverse", num_soft_tokens=2, activation="gelu", seed=72)
    log = tmp_path / "server.log"
    cmd = lambda port: serve_command(  # noqa: E731
        tiny_model_dir, port, "--enable-iapt", "--iapt-modules", f"sort={sort}", f"reverse={reverse}",
        "--api-server-count", "2", "--enable-log-requests")
    paths = {BASE: None, "sort": sort, "reverse": reverse}
    def ask(url, model, ids):
        # A new client (a new connection) per request, many at once: both servers accept.
        with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return client.completions.create(model=model, prompt=ids, max_tokens=6, **GREEDY)

    def answering_pids(text: str) -> set[str]:
        return set(re.findall(r"\((?:APIServer|ApiServer)\S* pid=(\d+)\)[^\n]*Received request", text))

    with ServerProcess(cmd, log, {"VLLM_CPU_KVCACHE_SPACE": "1"}) as proc:
        for round_ in range(4):  # until both servers have answered (each round is checked in full)
            jobs = [(model, random_ids(5 + i, 300 + 40 * round_ + i)) for i in range(12)
                    for model in (BASE, "sort", "reverse")]
            with ThreadPoolExecutor(12) as pool:
                results = list(pool.map(lambda job: ask(proc.url, *job), jobs))
            for (model, ids), res in zip(jobs, results):
                assert res.choices[0].token_ids == reference.generate(ids, paths[model], 6).token_ids, (model, len(ids))
                assert res.model == model
            if len(answering_pids(log.read_text(errors="replace"))) >= 2:
                break
        text = log.read_text(errors="replace")
    assert len(answering_pids(text)) == 2, text[-3000:]
    assert "LoRA is not enabled" not in text


def test_stopping_server_drains_and_answers_new_requests_503(tiny_model_dir, adapter_factory, tmp_path, reference):
    """SIGTERM to the API server with --shutdown-timeout (vLLM's drain mode): the
    running adapter request finishes with the reference's tokens, and requests that
    arrive while it drains get 503 naming the shutdown (vLLM alone answers 500
    "cannot schedule new futures after shutdown"); the server then exits cleanly."""
    import signal

    sort = adapter_factory("stop-sort", num_soft_tokens=4, seed=81)
    log = tmp_path / "server.log"
    cmd = lambda port: serve_command(  # noqa: E731
        tiny_model_dir, port, "--enable-iapt", "--iapt-modules", f"sort={sort}", "--shutdown-timeout", "60")
    long_ids, probe_ids = random_ids(9, 901), random_ids(6, 902)
    proc = ServerProcess(cmd, log, {"VLLM_CPU_KVCACHE_SPACE": "1"})
    with proc:
        body = {"model": "sort", "prompt": long_ids, "max_tokens": 400, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True, "stream": True}
        streamed: list[int] = []
        probes: list[tuple[str, int, str]] = []
        with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=300) as stream:
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    streamed += json.loads(line[6:])["choices"][0].get("token_ids") or []
                    break
            os.kill(proc.proc.pid, signal.SIGTERM)  # the API server only, as a container runtime does
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(code == 503 for _, code, _ in probes):
                for kind, route, payload in (
                        ("completion sort", "/v1/completions", {"model": "sort", "prompt": probe_ids, "max_tokens": 4}),
                        ("completion base", "/v1/completions", {"model": BASE, "prompt": probe_ids, "max_tokens": 4}),
                        ("chat sort", "/v1/chat/completions",
                         {"model": "sort", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 4})):
                    try:
                        r = httpx.post(proc.url + route, json=payload, timeout=20)
                        probes.append((kind, r.status_code, r.text[:300]))
                    except httpx.ConnectError as e:  # the server stopped listening: also a clean refusal
                        probes.append((kind, 0, repr(e)))
                    except httpx.TransportError as e:  # a hang or a cut connection: a failure
                        probes.append((kind, -1, repr(e)))
            for line in lines:
                if line.startswith("data: {"):
                    streamed += json.loads(line[6:])["choices"][0].get("token_ids") or []
        code = proc.proc.wait(120)
    text = log.read_text(errors="replace")
    assert streamed == reference.generate(long_ids, sort, 400).token_ids, text[-3000:]
    assert not [p for p in probes if p[1] == -1 or (p[1] >= 500 and p[1] != 503)], probes
    refused = [p for p in probes if p[1] == 503]
    assert refused and all(MESSAGE in p[2] for p in refused), probes
    assert code == 0, text[-3000:]
