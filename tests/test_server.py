"""`vllm serve --enable-iapt` as a real process on loopback, spoken to with the
`openai` client (and plain HTTP for the adapter-management routes).

One server is shared by the module (start-up is slow); a second, short-lived one
checks that a bad start-up adapter stops the server. Outputs are compared token
for token with the transformers reference model (greedy), which the engine tests
already tie to the offline engine.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import random_ids
from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.serving.process import ServerProcess, vllm_serve
from vllm_iapt.toy import random_adapter

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

BASE = "tiny"
VLLM = str(Path(sys.executable).with_name("vllm"))
GREEDY = {"temperature": 0.0, "extra_body": {"return_token_ids": True, "ignore_eos": True}}


def serve_command(model_dir, port: int, *extra: str) -> list[str]:
    """Eager: compilation is tests/test_compile.py's subject (and the demo's
    `scripts/demo.sh` test serves compiled, as a user would)."""
    return vllm_serve(str(model_dir), "--served-model-name", BASE, "--dtype", "float32", "--max-model-len", "512",
                      "--seed", "0", "--enforce-eager", *extra, port=port)


class Server:
    def __init__(self, url: str, log: Path, paths: dict[str, str], adapter_dir: Path) -> None:
        self.url, self.log, self.paths, self.adapter_dir = url, log, paths, adapter_dir

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def post(self, route: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + route, json=body, timeout=300)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_factory, tmp_path_factory):
    # Start-up adapters live outside the run-time directory on purpose: the
    # operator may put them anywhere, HTTP loads may not reach them.
    sort = adapter_factory("srv-sort", num_soft_tokens=4, activation="rational", seed=21)
    reverse = adapter_factory("srv-reverse", num_soft_tokens=2, activation="gelu", layers=[0], bottleneck_dim=8, seed=22)
    adapter_dir = tmp_path_factory.mktemp("runtime-adapters")
    for name, seed, kw in [("sub/rt", 23, {}), ("sub/late", 24, {"num_soft_tokens": 3}), ("found", 25, {}),
                           ("badsize", 26, {"hidden_size": 64})]:
        random_adapter(adapter_dir / name, **{"hidden_size": 128, "num_hidden_layers": 2, "seed": seed, **kw})
    os.symlink(sort, adapter_dir / "link-out")  # a name inside, files outside
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    cmd = lambda port: serve_command(  # noqa: E731
        tiny_model_dir, port, "--enable-iapt", "--iapt-modules", f"sort={sort}",
        json.dumps({"name": "reverse", "path": str(reverse), "base_model_name": BASE}),
        "--max-iapt-adapters", "2", "--max-cpu-iapt-adapters", "4", "--iapt-adapter-dir", str(adapter_dir),
        "--enable-prompt-tokens-details")
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with ServerProcess(cmd, log, env) as proc:
        paths = {"sort": str(sort), "reverse": str(reverse), BASE: None, "rt": str(adapter_dir / "sub/rt"),
                 "late": str(adapter_dir / "sub/late"), "found": str(adapter_dir / "found")}
        yield Server(proc.url, log, paths, adapter_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def complete(client, model: str, prompt, max_tokens: int = 8, **kwargs):
    args = {**GREEDY, **kwargs}
    args["extra_body"] = {**GREEDY["extra_body"], **kwargs.get("extra_body", {})}
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **args)


def test_help_lists_every_option():
    out = subprocess.run([VLLM, "serve", "--help=IAPT"], capture_output=True, text=True, timeout=300).stdout
    for flag in ["--enable-iapt", "--iapt-modules", "--iapt-adapter-dir", "--max-iapt-adapters",
                 "--max-cpu-iapt-adapters", "--iapt-placeholder-token-id", "--iapt-allow-unchecked-vllm"]:
        assert flag in out, flag
    from vllm_iapt.serving.cli import option_flag

    for name in IAPTEngineConfig.model_fields:  # every offline option has a flag
        assert option_flag(name) in out, name


def test_flags_fold_into_engine_config():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args([
        "--model", "m", "--enable-iapt", "--max-iapt-adapters", "3", "--iapt-placeholder-token-id", "5",
        "--iapt-allow-unchecked-vllm", "--additional-config", '{"iapt": {"max_cpu_adapters": 6}, "other": 1}',
        "--iapt-modules", "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}'])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {"other": 1, "iapt": {
        "max_cpu_adapters": 6, "max_adapters": 3, "placeholder_token_id": 5, "allow_unchecked_vllm": True}}
    assert [(m.name, m.path, m.base_model_name) for m in args.lora_modules] == [("a", "/x", None), ("b", "/y", "m")]
    AsyncEngineArgs.from_cli_args(args)  # idempotent: every API-server process folds the same namespace
    assert len(args.lora_modules) == 2
    with pytest.raises(ValueError, match="--max-iapt-adapters need --enable-iapt"):
        AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", "--max-iapt-adapters", "3"]))
    plain = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    assert "iapt" not in (plain.additional_config or {})


def test_models_lists_adapters(server):
    cards = {m.id: m for m in server.client().models.list().data}
    assert set(cards) == {BASE, "sort", "reverse"}
    for name in ("sort", "reverse"):
        assert cards[name].root == server.paths[name] and cards[name].parent == BASE
    log = server.log_text()
    assert re.search(r"IAPT adapters loaded: sort \(.*srv-sort\), reverse \(.*srv-reverse\)", log), log[-3000:]


def test_completions_match_reference(server, reference, tokenizer):
    client = server.client()
    prompts = [random_ids(n, 500 + n) for n in (1, 9, 60, 300)]
    outputs = {}
    for model in (BASE, "sort", "reverse"):
        for ids in prompts:
            res = complete(client, model, ids)
            ref = reference.generate(ids, server.paths[model], 8)
            assert res.choices[0].token_ids == ref.token_ids, (model, len(ids))
            assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(ids), 8)
            assert res.model == model
            outputs[model, len(ids)] = tuple(ref.token_ids)
        text = "alpha beta gamma 3 1 2"
        res = complete(client, model, text)
        assert res.choices[0].token_ids == reference.generate(tokenizer(text)["input_ids"], server.paths[model], 8).token_ids
    assert len({outputs[m, 60] for m in (BASE, "sort", "reverse")}) == 3  # adapters do change the answer


def test_streaming_equals_non_streaming(server):
    client = server.client()
    ids = random_ids(40, 7)
    for model in (BASE, "sort"):
        full = complete(client, model, ids, max_tokens=12)
        chunks = list(complete(client, model, ids, max_tokens=12, stream=True, stream_options={"include_usage": True}))
        tokens = [t for c in chunks if c.choices for t in (c.choices[0].token_ids or [])]
        assert tokens == full.choices[0].token_ids
        assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
        assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 12


def test_chat_pools_the_templated_prompt(server, reference, tokenizer):
    client = server.client()
    messages = [{"role": "user", "content": "sort three one two"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for model in (BASE, "reverse"):
        kwargs = {"model": model, "messages": messages, "max_tokens": 8, **GREEDY}
        res = client.chat.completions.create(**kwargs)
        ref = reference.generate(ids, server.paths[model], 8)
        assert res.prompt_token_ids == ids
        assert res.choices[0].token_ids == ref.token_ids, model
        assert res.usage.prompt_tokens == len(ids)
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == res.choices[0].message.content


def continuation_logprobs(reference, ids: list[int], continuation: list[int], adapter_path) -> list[float]:
    """log P(continuation[i] | ids + continuation[:i]), the generators pooling ``ids`` only."""
    import torch

    full = torch.tensor([ids + continuation])
    with torch.no_grad():
        logits = reference.model(adapter_path)(full, instruction_lengths=torch.tensor([len(ids)]))["logits"][0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [float(lp[len(ids) + i - 1, t]) for i, t in enumerate(continuation)]


def test_logprobs_n_and_stop(server, reference):
    client = server.client()
    ids = random_ids(30, 31)
    for model in (BASE, "sort"):
        ref = reference.generate(ids, server.paths[model], 8)
        res = complete(client, model, ids, logprobs=1)
        assert res.choices[0].token_ids == ref.token_ids
        for a, b in zip(res.choices[0].logprobs.token_logprobs, ref.logprobs, strict=True):
            assert math.isclose(a, b, abs_tol=2e-3), (model, a, b)
        # n > 1 samples; each sample's logprobs are the adapter's, scored by the reference.
        res = complete(client, model, ids, logprobs=1, n=3, temperature=1.0, seed=5)
        assert len(res.choices) == 3 and res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == 24
        for choice in res.choices:
            scored = continuation_logprobs(reference, ids, choice.token_ids, server.paths[model])
            for a, b in zip(choice.logprobs.token_logprobs, scored, strict=True):
                assert math.isclose(a, b, abs_tol=2e-3), (model, a, b)
    # Stop strings: the text ends right before the first match, as for the base model.
    for model in (BASE, "sort"):
        for seed in range(20):
            full = complete(client, model, random_ids(12, 700 + seed), max_tokens=16).choices[0].text
            hits = [i for i in range(1, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isalnum()]
            if hits:
                break
        assert hits, f"no usable stop string in {model}'s outputs"
        stop_str = full[hits[0]:hits[0] + 2]
        res = complete(client, model, random_ids(12, 700 + seed), max_tokens=16, stop=[stop_str])
        assert res.choices[0].text == full[:full.index(stop_str)] and res.choices[0].finish_reason == "stop"


def test_cache_salt(server, reference):
    client = server.client()
    ids = random_ids(300, 77)  # more than two KV blocks
    for model in (BASE, "sort"):
        ref = reference.generate(ids, server.paths[model], 4).token_ids
        cached = []
        for salt in (f"{model}-a", f"{model}-a", f"{model}-b"):
            res = complete(client, model, ids, max_tokens=4, extra_body={"cache_salt": salt})
            assert res.choices[0].token_ids == ref
            details = res.usage.prompt_tokens_details
            cached.append(details.cached_tokens if details else 0)
        assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0, (model, cached)


def test_errors(server):
    from openai import NotFoundError

    client = server.client()
    with pytest.raises(NotFoundError) as e:
        complete(client, "no-such-model", [1, 5, 6])
    assert e.value.status_code == 404 and e.value.body["type"] == "NotFoundError"
    rejected = {
        "badsize": ("badsize", "hidden_size 64"),        # invalid adapter: 400 with the reason
        "x1": (server.paths["sort"], "outside"),          # absolute path outside the directory
        "x2": ("../" + Path(server.paths["sort"]).name, "outside"),
        "x3": ("link-out", "outside"),                     # symlink inside pointing outside
        "x4": ("/nonexistent/adapter", "outside"),         # refused before anything is read
        "a/b": ("sub/rt", "not a plain name"),
        "../x": ("sub/rt", "not a plain name"),
        "x5": ("missing", "does not exist"),
    }
    for name, (path, reason) in rejected.items():
        r = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert r.status_code == 400, (name, r.text)
        assert reason in r.json()["error"]["message"] and r.json()["error"]["code"] == 400, (name, r.text)
    # The resolver: a plain unknown name found in the directory is loaded, a bad one is a 400, a path is a 404.
    assert complete(client, "found", [1, 9, 9]).model == "found"
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="hidden_size 64"):
        complete(client, "badsize", [1, 9, 9])
    with pytest.raises(NotFoundError):
        complete(client, "sub/rt", [1, 9, 9])
    with pytest.raises(NotFoundError):
        complete(client, "link-out", [1, 9, 9])
    models = {m.id for m in client.models.list().data}
    assert "found" in models and not models & {"badsize", "x1", "x2", "x3", "a/b", "link-out"}
    with pytest.raises(BadRequestError, match="soft tokens"):  # fits without the slots, not with them
        complete(client, "sort", random_ids(509, 3), max_tokens=1)
    # An adapter broken on disk after it was loaded fails its requests only, with a 400.
    fragile = server.adapter_dir / "sub" / "fragile"
    random_adapter(fragile, hidden_size=128, num_hidden_layers=2, seed=27)
    assert server.post("/v1/load_lora_adapter", {"lora_name": "fragile", "lora_path": "sub/fragile"}).status_code == 200
    assert complete(client, "fragile", [1, 9, 9]).model == "fragile"
    config = json.loads((fragile / "adapter_config.json").read_text())
    (fragile / "adapter_config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(BadRequestError, match="fragile"):
        complete(client, "fragile", [1, 9, 9])
    assert complete(client, "sort", [1, 9, 9]).choices[0].finish_reason == "length"  # still serving


def _count(metrics_text: str, adapter: str) -> float:
    m = re.search(r'^vllm_iapt:requests_total\{(?=[^}]*adapter="%s")[^}]*\} (\S+)$' % re.escape(adapter),
                  metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_count_requests_per_adapter(server):
    client = server.client()
    before = httpx.get(server.url + "/metrics").text
    for _ in range(3):
        complete(client, "reverse", [1, 4, 4])
    complete(client, BASE, [1, 4, 4], n=2, temperature=1.0)  # one request, two samples
    after = httpx.get(server.url + "/metrics").text
    assert _count(after, "reverse") - _count(before, "reverse") == 3
    assert _count(after, BASE) - _count(before, BASE) == 1
    assert _count(after, "sort") == _count(before, "sort")


def test_concurrent_tenants_with_runtime_load_and_unload(server, reference):
    """36 concurrent requests over three tenants, while `rt` (with requests in
    flight) is unloaded and `late` is loaded; every answer is its own tenant's."""
    from openai import AsyncOpenAI, NotFoundError

    r = server.post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": "sub/rt"})
    assert r.status_code == 200, r.text
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    jobs = [(model, random_ids(5 + 7 * i, 900 + i)) for i in range(12) for model in (BASE, "sort", "reverse")]
    rt_prompts = [random_ids(20 + i, 950 + i) for i in range(4)]
    late_prompts = [random_ids(15 + i, 970 + i) for i in range(4)]

    async def one(model, ids, max_tokens=8):
        res = await client.completions.create(model=model, prompt=ids, max_tokens=max_tokens, **GREEDY)
        return res.choices[0].token_ids

    async def rest_of(stream, first):
        tokens = list(first.choices[0].token_ids or [])
        async for chunk in stream:
            if chunk.choices:
                tokens += chunk.choices[0].token_ids or []
        return tokens

    async def main():
        streams = [await client.completions.create(model="rt", prompt=ids, max_tokens=128, stream=True, **GREEDY)
                   for ids in rt_prompts]
        firsts = [await s.__anext__() for s in streams]  # every rt request is running
        tasks = [asyncio.create_task(one(m, ids)) for m, ids in jobs]
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            loaded = await http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "sub/late"})
            unloaded = await http.post("/v1/unload_lora_adapter", json={"lora_name": "rt"})
        late = [asyncio.create_task(one("late", ids)) for ids in late_prompts]
        rt = await asyncio.gather(*(rest_of(s, f) for s, f in zip(streams, firsts)))
        return loaded, unloaded, await asyncio.gather(*tasks), await asyncio.gather(*late), rt

    loaded, unloaded, got, got_late, got_rt = asyncio.run(main())
    assert loaded.status_code == 200 and unloaded.status_code == 200, (loaded.text, unloaded.text)
    for (model, ids), tokens in zip(jobs, got):
        assert tokens == reference.generate(ids, server.paths[model], 8).token_ids, (model, len(ids))
    for ids, tokens in zip(late_prompts, got_late):
        assert tokens == reference.generate(ids, server.paths["late"], 8).token_ids
    for ids, tokens in zip(rt_prompts, got_rt):  # unloaded while running: completed, with its own adapter
        assert tokens == reference.generate(ids, server.paths["rt"], 128).token_ids
    sync = server.client()
    with pytest.raises(NotFoundError):
        complete(sync, "rt", [1, 2, 3])
    models = {m.id for m in sync.models.list().data}
    assert "late" in models and "rt" not in models
    log = server.log_text()
    assert "IAPT adapter 'late' loaded from" in log and "IAPT adapter 'rt' unloaded" in log


def test_bad_startup_adapter_stops_the_server(tiny_model_dir, tmp_path):
    bad = tmp_path / "broken-adapter"
    random_adapter(bad, hidden_size=128, num_hidden_layers=3, seed=1)  # the model has 2 layers
    # Eager: the engine starts before the adapters are checked, and compiling it would only cost time here.
    cmd = lambda port: serve_command(tiny_model_dir, port, "--enable-iapt", "--iapt-modules", f"broken={bad}")  # noqa: E731
    with pytest.raises(RuntimeError, match="server exited") as e:
        with ServerProcess(cmd, tmp_path / "server.log", {"VLLM_CPU_KVCACHE_SPACE": "1"}):
            pass
    assert "server exited with 0" not in str(e.value)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "cannot load adapter 'broken'" in log and "num_hidden_layers" in log, log[-3000:]


def test_beam_search_with_an_adapter_is_a_400(server):
    from openai import BadRequestError

    client = server.client()
    beam = {"use_beam_search": True, "n": 2}
    with pytest.raises(BadRequestError, match="beam search is not supported with IAPT adapters") as e:
        complete(client, "sort", [1, 9, 9], max_tokens=4, extra_body=beam)
    assert e.value.status_code == 400
    # The base model's beam search is vLLM's own, and the server keeps serving adapters.
    assert len(complete(client, BASE, [1, 9, 9], max_tokens=4, extra_body=beam).choices) == 2
    assert complete(client, "sort", [1, 9, 9]).choices[0].finish_reason == "length"
