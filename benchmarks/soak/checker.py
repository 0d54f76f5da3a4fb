"""Correctness: the reference answers, and what each answer or failure counts as
(correct, leak, mismatch, an expected refusal, an error)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
from tqdm import tqdm
from vllm_iapt.patches.shutdown import MESSAGE as STOPPING_MESSAGE

from .workload import Job


def compute_references(model_dir: Path, adapters: dict[str, str | None], prompts: list[list[int]], max_tokens: int,
                       cache: Path) -> dict:
    """``{model: [(tokens, min_margin) per prompt]}``: greedy reference outputs and,
    per output, the smallest top-1/top-2 log-probability gap over its steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_iapt.reference import IAPTForCausalLM

    sig = hashlib.sha256()
    sig.update((model_dir / "model.safetensors").read_bytes())
    for name, path in sorted(adapters.items()):
        sig.update(name.encode())
        if path:
            sig.update((Path(path) / "adapter_model.safetensors").read_bytes())
            sig.update((Path(path) / "adapter_config.json").read_bytes())
    sig.update(json.dumps([prompts, max_tokens]).encode())
    key = sig.hexdigest()
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return data["refs"]
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    refs = {}
    for name, path in tqdm(sorted(adapters.items()), desc="reference outputs", leave=False):
        model = IAPTForCausalLM.from_pretrained(base, path)
        rows = []
        for ids in prompts:
            out = model.generate(ids, max_tokens).token_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids + out]), instruction_lengths=torch.tensor([len(ids)]))["logits"][0]
            lp = torch.log_softmax(logits.float(), dim=-1)[len(ids) - 1: len(ids) - 1 + max_tokens]
            top2 = lp.topk(2, dim=-1).values
            rows.append((out, float((top2[:, 0] - top2[:, 1]).min())))
        refs[name] = rows
    cache.write_text(json.dumps({"key": key, "refs": refs}))
    return refs


def acceptable_change_outcome(verdict: str) -> bool:
    """After an adapter's files changed, a request may be served with the content
    validated at load ("correct"), with the new files' content once the server
    validated it again ("served new content"), or refused with a 4xx. Anything
    else (another adapter's or an outside directory's output, a wrong answer, a
    5xx, a dropped connection) is a violation."""
    return verdict.split(": ")[-1] in ("correct", "clean 4xx", "served new content")


class Checker:
    """Part of :class:`~.run.Run`: builds ``ref`` ({(model, kind, prompt): tokens})
    and the pool of prompts without near-ties, judges answers against ``ref``, and
    counts them in ``results``, ``status_codes``, ``latencies`` and ``unexpected``."""

    def references(self) -> None:
        """Reference answers of every model on every prompt; prompts with a near-tie
        for any model are dropped from the pool (``cmpl_ok``, ``chat_ok``)."""
        all_prompts = self.cmpl + [ids for _, ids in self.chat]
        refs = compute_references(self.model_dir, self.paths, all_prompts, self.s.max_tokens,
                                  self.work / "references.json")
        n = len(self.cmpl)
        keep = [i for i in range(len(all_prompts)) if min(refs[m][i][1] for m in refs) >= self.s.min_margin]
        self.dropped_prompts = len(all_prompts) - len(keep)
        self.ref = {(m, "cmpl" if i < n else "chat", i if i < n else i - n): refs[m][i][0]
                    for m in refs for i in keep}
        self.cmpl_ok = [i for i in keep if i < n]
        self.chat_ok = [i - n for i in keep if i >= n]
        served = [m for m in refs if not m.startswith("mut:") and m != "outside"]
        distinct = sum(len({tuple(refs[m][i][0]) for m in served}) == len(served) for i in keep)
        self.distinct_prompts = distinct
        self.served_models = served

    def classify(self, job: Job, res: dict, model_key: str | None = None, others: list[str] | None = None) -> str:
        """correct / leak / mismatch (200s), aborted-ok / aborted-mismatch, or the status."""
        key = model_key or job.model
        status = res["status"]
        if status != 200:
            return f"status:{status}"
        got = res.get("tokens")
        if got is None:
            return "mismatch"
        own = self.ref[(key, job.kind, job.prompt)][: job.max_tokens]
        if res.get("aborted"):
            return "aborted-ok" if own[: len(got)] == got else "aborted-mismatch"
        if got == own:
            return "correct"
        for other in (others if others is not None else self.served_models):
            if other != key and self.ref.get((other, job.kind, job.prompt), [])[: job.max_tokens] == got:
                return "leak"
        return "mismatch"

    def record(self, job: Job, res: dict, verdict: str, latency: float, context: str = "traffic") -> None:
        """Counts one answer: its verdict, or, for a failure, whether the run expected
        it (an unloaded run-time adapter, a stopped server, a 503 naming the shutdown)."""
        status = res["status"]
        self.status_codes[str(status)] += 1
        self.latencies.append((time.monotonic() - self.t0, latency, job.kind))
        if verdict.startswith("status:"):
            expected = False
            if status == 404 and job.model in self.runtime:
                expected = True  # unloaded by the churn (or racing with it)
            elif status in ("connection", "timeout") and (self.restarting or not self.alive()):
                expected = True  # in flight while the server was stopped
            if status == 503 and self.restarting and STOPPING_MESSAGE in (res.get("error") or ""):
                self.results["refused-while-stopping"] += 1  # arrived during a planned stop: patches/shutdown.py
            else:
                self.results["expected-unavailable" if expected else "error"] += 1
            if not expected:
                self.problem(what="error", context=context, model=job.model, kind=job.kind, stream=job.stream,
                             status=status, detail=res.get("error"))
        else:
            self.results[verdict] += 1
            if verdict not in ("correct", "aborted-ok"):
                self.problem(what=verdict, context=context, model=job.model, kind=job.kind, stream=job.stream,
                             prompt=job.prompt, max_tokens=job.max_tokens, got=res.get("tokens"),
                             want=self.ref[(job.model, job.kind, job.prompt)][: job.max_tokens])
        if res.get("aborted"):
            self.faults["client_abort"]["injected"] += 1

    async def run_canary(self, http: httpx.AsyncClient) -> None:
        """Proves the checker can fail: one request to 'sort' is checked as if it
        were for 'reverse', and must be classified as a leak (not counted)."""
        prompt = next((p for p in self.cmpl_ok if self.ref[("sort", "cmpl", p)] != self.ref[("reverse", "cmpl", p)]),
                      None)
        if prompt is None:
            self.canary = {"detected": False, "why": "no prompt separates sort from reverse"}
            return
        job = Job(-1, "cmpl", False, "sort", prompt, self.s.max_tokens)
        res = await self.send(http, job)
        self.canary = {"sent_to": "sort", "checked_as": "reverse", "status": res["status"],
                       "verdict": self.classify(job, res, "reverse"),
                       "verdict_as_sort": self.classify(job, res, "sort")}
        self.canary["detected"] = self.canary["verdict"] == "leak" and self.canary["verdict_as_sort"] == "correct"
