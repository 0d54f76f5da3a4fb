"""Traffic: the prompt pool, the request plan (which model, prompt, streaming,
client abort) and the clients that send it and count what came back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from typing import TYPE_CHECKING

import httpx
from tqdm import tqdm

from . import BASE

if TYPE_CHECKING:
    from .cli import Settings

LETTERS = "abcdefgh"


@dataclasses.dataclass
class Job:
    idx: int
    kind: str  # "cmpl" | "chat"
    stream: bool
    model: str
    prompt: int
    max_tokens: int
    abort_after: int | None = None  # streaming chunks read before the client hangs up


def build_prompts(s: Settings, tokenizer) -> tuple[list[list[int]], list[tuple[list[dict], list[int]]]]:
    """The pool: completion prompts (token ids, lengths 1..max) and chat prompts
    (messages, and their token ids after the chat template)."""
    rng = random.Random(s.seed)
    limit = s.max_model_len - 8 - s.max_tokens - 1  # room for the largest soft-token count and the output
    texts = []
    for _ in range(s.prompts // 3):
        xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        texts.append(" ".join(xs) + " =>")
    cmpl = [tokenizer(t)["input_ids"] for t in texts]
    vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 290
    lengths = [1, 2, 3, limit, limit - 1] + [rng.randint(1, limit) for _ in range(s.prompts)]
    for n in lengths[: s.prompts - len(cmpl)]:
        cmpl.append([tokenizer.bos_token_id] + [rng.randrange(3, vocab - 1) for _ in range(n - 1)])
    chat = []
    for i in range(s.chat_prompts):
        xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        content = " ".join(xs) + " =>" if i % 2 == 0 else " ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 60)))
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        chat.append((messages, tokenizer(text, add_special_tokens=False)["input_ids"]))
    return cmpl, chat


class Workload:
    """Part of :class:`~.run.Run`: plans the requests and sends them. Uses the
    pool (``cmpl``, ``chat``, ``cmpl_ok``, ``chat_ok``, ``served_models``), the
    models (``static``, ``runtime``, ``resolved``, ``loaded_runtime``), ``server``,
    ``rng``; counts ``done`` and ``prefix_cached_tokens``."""

    async def post(self, http: httpx.AsyncClient, route: str, body=None, raw: bytes | None = None,
                   timeout: float = 60) -> tuple[int | str, str]:
        """An administrative request (load, unload): (status code, or "timeout" /
        "connection"; the start of the body or of the error)."""
        try:
            if raw is not None:
                r = await http.post(self.server.url + route, content=raw, timeout=timeout,
                                    headers={"Content-Type": "application/json"})
            else:
                r = await http.post(self.server.url + route, json=body, timeout=timeout)
            return r.status_code, r.text[:400]
        except httpx.TimeoutException:
            return "timeout", ""
        except httpx.HTTPError as e:
            return "connection", repr(e)[:200]

    def plan(self) -> list[Job]:
        s, rng = self.s, self.rng
        models = ([BASE] * 3 + list(self.static) * 2 + list(self.runtime) * 2 + list(self.resolved))
        if s.control:
            models = [BASE]
        # Warm-up sweep first: every (model, prompt) once, so every adapter and prompt
        # length has been through the engine before memory growth is measured.
        sweep = [(m, kind, p) for m in (models if s.control else self.served_models)
                 for kind, pool in (("cmpl", self.cmpl_ok), ("chat", self.chat_ok)) for p in pool]
        jobs = [Job(i, kind, False, m, p, s.max_tokens) for i, (m, kind, p) in enumerate(sweep[: s.requests // 2])]
        self.warmup_requests = len(jobs)
        # The hottest completion prompts are at least two KV blocks long: only full
        # blocks are cached, so their repeats can hit the prefix cache.
        hot = {"chat": self.chat_ok, "cmpl": sorted(self.cmpl_ok, key=lambda i: len(self.cmpl[i]) < 2 * s.block_size)}
        for i in range(len(jobs), s.requests):
            kind = "chat" if self.chat_ok and rng.random() < 0.3 else "cmpl"
            pool = self.chat_ok if kind == "chat" else self.cmpl_ok
            # Zipf-ish: a few hot prompts (prefix-cache hits) and a long tail.
            prompt = hot[kind][min(int(rng.paretovariate(1.2)) - 1, len(pool) - 1)] if rng.random() < 0.5 else rng.choice(pool)
            stream = rng.random() < 0.5
            abort = rng.randint(1, 3) if stream and rng.random() < s.abort_fraction / 0.5 else None
            jobs.append(Job(i, kind, stream, rng.choice(models), prompt, rng.randint(1, s.max_tokens), abort))
        return jobs

    def body(self, job: Job, model: str | None = None) -> dict:
        body = {"model": model or job.model, "max_tokens": job.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True, "stream": job.stream}
        if job.stream:
            body["stream_options"] = {"include_usage": True}
        if job.kind == "chat":
            body["messages"] = self.chat[job.prompt][0]
        else:
            body["prompt"] = self.cmpl[job.prompt]
        return body

    async def send(self, http: httpx.AsyncClient, job: Job, model: str | None = None) -> dict:
        """One request; returns {"status", "tokens", "aborted", "error"}."""
        route = "/v1/chat/completions" if job.kind == "chat" else "/v1/completions"
        url = self.server.url + route
        body = self.body(job, model)
        try:
            if not job.stream:
                r = await http.post(url, json=body, timeout=self.args.request_timeout)
                if r.status_code != 200:
                    return {"status": r.status_code, "error": r.text[:300]}
                data = r.json()
                self.prefix_cached_tokens += ((data.get("usage") or {}).get("prompt_tokens_details") or {}).get(
                    "cached_tokens") or 0
                return {"status": 200, "tokens": data["choices"][0].get("token_ids")}
            tokens: list[int] = []
            chunks = 0
            async with http.stream("POST", url, json=body, timeout=self.args.request_timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    return {"status": r.status_code, "error": r.text[:300]}
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        err = obj["error"]
                        return {"status": err.get("code", "stream-error"), "error": str(err)[:300]}
                    for c in obj.get("choices") or []:
                        tokens += c.get("token_ids") or (c.get("delta") or {}).get("token_ids") or []
                    usage = obj.get("usage") or {}
                    self.prefix_cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    chunks += 1
                    if job.abort_after is not None and chunks >= job.abort_after:
                        return {"status": 200, "tokens": tokens, "aborted": True}
            return {"status": 200, "tokens": tokens}
        except httpx.TimeoutException:
            return {"status": "timeout", "error": "client timeout"}
        except httpx.HTTPError as e:
            return {"status": "connection", "error": repr(e)[:200]}

    async def worker(self, http: httpx.AsyncClient, queue: asyncio.Queue, bar: tqdm, deadline: float) -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if time.monotonic() > deadline:
                self.results["not-sent (time limit)"] += 1
                bar.update()
                continue
            while self.gate is not None and self.done > (self.gate + 0.05) * self.s.requests:
                await asyncio.sleep(0.05)
            await self.serving.wait()
            if job.model in self.runtime and self.loaded_runtime and self.rng.random() < 0.8:
                job.model = self.rng.choice(sorted(self.loaded_runtime))  # mostly loaded ones; some 404s
            t = time.monotonic()
            res = await self.send(http, job)
            verdict = self.classify(job, res)
            self.record(job, res, verdict, time.monotonic() - t)
            self.done += 1
            bar.update()
            if res["status"] in ("connection", "timeout") and not self.restarting:
                await self.check_alive("connection error during traffic")

