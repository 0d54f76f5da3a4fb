"""Faults injected while traffic runs: load/unload churn, malformed loads, adapter
files changed after they were loaded, planned restarts, and their schedule."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections import Counter

import httpx

from .checker import acceptable_change_outcome
from .workload import Job


class Faults:
    """Part of :class:`~.run.Run`: counts each fault in ``faults`` ({fault:
    {"injected", "survived"}}), malformed loads' statuses in ``catalogue_results``,
    file changes' outcomes in ``mutation_results``. Planned restarts are
    :meth:`~.servers.Servers.restart`."""

    MUTATIONS = ("replace_weights_after_use", "replace_same_stamp_before_use", "replace_same_stamp_after_use",
                 "delete_weights_after_use", "delete_dir_before_use", "truncate_weights_after_use",
                 "corrupt_config_after_use", "relink_inside_after_use", "relink_outside_after_use",
                 "replace_and_restore")

    async def churn(self, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """Every ``churn_period`` seconds, one run-time adapter loaded, unloaded or
        reloaded in place (``load_inplace``) while traffic uses it."""
        names = sorted(self.runtime)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.s.churn_period)
                return
            except asyncio.TimeoutError:
                pass
            await self.serving.wait()
            name = self.rng.choice(names)
            async with self.runtime_lock:
                rel = str(self.runtime[name].relative_to(self.adir))
                if name in self.loaded_runtime and self.rng.random() < 0.25:
                    op, body = "reload_inplace", {"lora_name": name, "lora_path": rel, "load_inplace": True}
                    status, text = await self.post(http, "/v1/load_lora_adapter", body)
                    ok = status == 200
                elif name in self.loaded_runtime:
                    op = "unload"
                    status, text = await self.post(http, "/v1/unload_lora_adapter", {"lora_name": name})
                    ok = status == 200
                    if ok:
                        self.loaded_runtime.discard(name)
                else:
                    op = "load"
                    status, text = await self.post(http, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": rel})
                    ok = status == 200
                    if ok:
                        self.loaded_runtime.add(name)
            self.faults[f"churn_{op}"]["injected"] += 1
            if ok:
                self.faults[f"churn_{op}"]["survived"] += 1
            elif not self.restarting:
                self.problem(what=f"churn {op} failed", model=name, status=status, detail=text)
                await self.check_alive(f"churn {op}")

    async def malformed(self, http: httpx.AsyncClient, item: dict) -> None:
        """One item of the catalogue (:func:`~.adapters.build_catalogue`): must be refused with a 4xx."""
        status, text = await self.post(http, item["route"], item["body"], item["raw"], timeout=60)
        if status == "connection" and (self.restarting or not self.alive()):
            await self.check_alive("before a malformed load")  # the server was already down: try again
            await self.serving.wait()
            status, text = await self.post(http, item["route"], item["body"], item["raw"], timeout=60)
        ok = isinstance(status, int) and 400 <= status < 500
        self.catalogue_results[item["kind"]].append(status)
        self.faults["malformed_load"]["injected"] += 1
        if ok:
            self.faults["malformed_load"]["survived"] += 1
        else:
            self.problem(what="malformed load not refused with a 4xx", kind=item["kind"], status=status, detail=text)
            if status == 200 and item["body"] and isinstance(item["body"].get("lora_name"), str):
                await self.post(http, "/v1/unload_lora_adapter", {"lora_name": item["body"]["lora_name"]})
            await self.check_alive(f"malformed load {item['kind']}")
        self.event("malformed-load", fault=item["kind"], status=status)

    async def mutation(self, http: httpx.AsyncClient, kind: str, n: int) -> None:
        """Load an adapter (content a), change its files as ``kind`` says, then
        send requests: each must be served with content a, or refused with a 4xx."""
        name = f"mut-{n}"
        real = self.adir / "mut" / f"{name}-a"
        shutil.rmtree(self.adir / "mut" / name, ignore_errors=True)
        shutil.rmtree(real, ignore_errors=True)
        real.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.mut_a, real)
        link = self.adir / "mut" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(real.name, link)  # the loaded path is a link, so it can be re-linked
        status, text = await self.post(http, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"mut/{name}"})
        outcome = {"kind": kind, "name": name, "load_status": status, "requests": Counter()}
        self.faults["file_change"]["injected"] += 1
        if status != 200:
            outcome["requests"]["load failed"] += 1
            self.mutation_results.append(outcome)
            self.problem(what="mutation adapter did not load", kind=kind, status=status, detail=text)
            return
        self.mutation_models.add(name)
        prompts = self.cmpl_ok[:2]
        jobs = [Job(-1, "cmpl", i % 2 == 1, name, prompts[i % len(prompts)], self.s.max_tokens) for i in range(4)]

        async def probe(js: list[Job], phase: str) -> None:
            results = await asyncio.gather(*(self.send(http, j) for j in js))
            for j, res in zip(js, results):
                verdict = self.classify(j, res, "mut:a", ["mut:b", "outside", *self.served_models])
                if verdict == "leak":  # equal to another adapter's output
                    b = self.ref[("mut:b", j.kind, j.prompt)][: j.max_tokens]
                    o = self.ref[("outside", j.kind, j.prompt)][: j.max_tokens]
                    verdict = ("served new content" if res.get("tokens") == b else
                               "served outside content" if res.get("tokens") == o else "leak")
                self.status_codes[str(res["status"])] += 1
                st = res["status"]
                if verdict.startswith("status:") and isinstance(st, int) and 400 <= st < 500:
                    verdict = "clean 4xx"
                outcome["requests"][f"{phase}: {verdict}"] += 1
                if not acceptable_change_outcome(verdict):
                    self.problem(what=f"file change '{kind}': {verdict}", phase=phase, status=st,
                                 detail=res.get("error"), got=res.get("tokens"))

        if kind.endswith("after_use") or kind == "replace_and_restore":
            await probe(jobs[:2], "before")
        w = real / "adapter_model.safetensors"
        st = w.stat()
        if kind.startswith("replace_weights") or kind == "replace_and_restore":
            tmp = real / ".tmp"
            shutil.copy(self.mut_b / "adapter_model.safetensors", tmp)
            os.replace(tmp, w)
        elif kind.startswith("replace_same_stamp"):
            data = (self.mut_b / "adapter_model.safetensors").read_bytes()
            assert len(data) == st.st_size
            with open(w, "r+b") as f:  # in place, same size, then the old mtime back
                f.write(data)
            os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif kind.startswith("delete_weights"):
            w.unlink()
        elif kind.startswith("delete_dir"):
            shutil.rmtree(real)
        elif kind.startswith("truncate_weights"):
            with open(w, "r+b") as f:
                f.truncate(st.st_size // 3)
        elif kind.startswith("corrupt_config"):
            cfg = json.loads((real / "adapter_config.json").read_text())
            (real / "adapter_config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
        elif kind.startswith("relink_inside"):
            other = self.adir / "mut" / f"{name}-b"
            shutil.rmtree(other, ignore_errors=True)
            shutil.copytree(self.mut_b, other)
            tmp = self.adir / "mut" / f".{name}.tmp"
            os.symlink(other.name, tmp)
            os.replace(tmp, link)
        elif kind.startswith("relink_outside"):
            tmp = self.adir / "mut" / f".{name}.tmp"
            os.symlink(self.outside, tmp)
            os.replace(tmp, link)
        if kind == "replace_and_restore":
            await probe(jobs[2:], "changed")
            shutil.copy(self.mut_a / "adapter_model.safetensors", w)
            await probe(jobs, "restored")
        else:
            await probe(jobs, "after")
        await asyncio.sleep(0.5)
        alive = self.alive()
        outcome["server_alive"] = alive
        if not alive:
            await self.check_alive(f"file change {kind}")
        else:
            await self.post(http, "/v1/unload_lora_adapter", {"lora_name": name})
        bad = [k for k in outcome["requests"] if not acceptable_change_outcome(k)]
        if alive and not bad:
            self.faults["file_change"]["survived"] += 1
        self.mutation_results.append(outcome)
        self.event("file-change", fault=kind, survived=alive and not bad)

    async def faults_task(self, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """Malformed loads, file changes and planned restarts, each at its fraction of
        the requests; traffic may not run ahead of the next one (``gate``)."""
        s = self.s
        plan: list[tuple[float, str, object]] = []
        items = [item for _ in range(s.catalogue_rounds) for item in self.catalogue]
        for i, item in enumerate(items):
            plan.append((0.05 + 0.85 * i / len(items), "malformed", item))
        muts = [k for _ in range(s.mutation_rounds) for k in self.MUTATIONS]
        for i, k in enumerate(muts):
            plan.append((0.1 + 0.8 * i / len(muts), "mutation", k))
        for i in range(s.restarts):
            plan.append(((i + 1) / (s.restarts + 1), "restart", None))
        plan.sort(key=lambda x: x[0])
        n_mut = 0
        for frac, what, arg in plan:
            self.gate = frac
            while self.done < frac * s.requests and not stop.is_set():
                await asyncio.sleep(0.2)
            if stop.is_set():
                self.event("fault-not-run (traffic ended)", fault=what)
                continue
            await self.serving.wait()
            if what == "malformed":
                await self.malformed(http, arg)
            elif what == "mutation":
                n_mut += 1
                await self.mutation(http, arg, n_mut)
            else:
                await self.restart(planned=True)
        self.gate = None
