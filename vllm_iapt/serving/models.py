"""Loading IAPT adapters into the OpenAI server: validation, path rules, resolver.

vLLM's ``OpenAIServingModels`` would hand every adapter to ``engine_client.add_lora``,
which needs vLLM LoRA (off under IAPT) and turns every failure into HTTP 500. Here
an adapter is validated in the API server instead (the same
:class:`~vllm_iapt.engine.frontend.AdapterCatalog` the input processor uses, so
the first request does not validate it again) and a bad one is a 400 with the
reason. The worker reads the weights itself at the first prefill that needs them.

Start-up adapters (``--iapt-modules``) come from the operator and may live
anywhere. Run-time adapters come over HTTP, so their names must be plain (they
become path components) and their files must resolve, symlinks followed, inside
``--iapt-adapter-dir``; nothing else is ever read.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver
from vllm.utils.cache import LRUCache

from vllm_iapt.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_config_json
from vllm_iapt.engine.frontend import AdapterCatalog, AdapterInfo


#: A name usable as one path component and as an OpenAI model id.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Name under which the resolver is registered in vLLM's ``LoRAResolverRegistry``.
RESOLVER_NAME = "IAPT Directory Resolver"


def is_plain_name(name: str) -> bool:
    return bool(PLAIN_NAME.fullmatch(name or ""))


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


class IAPTServing:
    """What the OpenAI server needs to load IAPT adapters: one per API server, kept
    in its engine client's front-end state (``IAPTFrontend.serving``)."""

    def __init__(self, catalog: AdapterCatalog, adapter_dir: str | None, max_runtime: int = 64) -> None:
        self.catalog = catalog
        self.adapter_dir = os.path.realpath(adapter_dir) if adapter_dir else None
        self.max_runtime = max_runtime
        #: run-time adapter name -> loaded by the resolver (True) or explicitly (pinned: only
        #: an unload removes it); bounded by :meth:`evict_for`
        self.runtime: LRUCache[str, bool] = LRUCache(float("inf"))

    def track_runtime(self, name: str, resolved: bool) -> None:
        self.runtime[name] = resolved
        if not resolved:
            self.runtime.pin(name)
        else:
            self.runtime.pinned_items.discard(name)

    def untrack_runtime(self, name: str) -> None:
        self.runtime.pop(name, None)

    def touch(self, name: str) -> None:
        """A request used ``name``: it is now the most recently used."""
        self.runtime.touch(name)

    def evict_for(self, name: str) -> str | None | bool:
        """Room for one more run-time adapter: None if there is room, the name of
        the resolver-loaded adapter to unregister, or False if none can go."""
        if name in self.runtime or len(self.runtime) < self.max_runtime:
            return None
        if len(self.runtime.pinned_items) == len(self.runtime):  # all loaded explicitly
            return False
        victim, _ = self.runtime.popitem()
        return victim

    def runtime_path(self, name: str, path: str) -> str:
        """The real path of a run-time adapter, or a ValueError if it is not
        allowed. Checks the name and the location only; reads no file."""
        if not is_plain_name(name):
            raise ValueError(f"IAPT adapter name {name!r} is not a plain name "
                             f"(letters, digits, '.', '_', '-'; at most 128; no '/')")
        if self.adapter_dir is None:
            raise ValueError(f"IAPT adapter {name!r}: run-time loading needs --iapt-adapter-dir")
        root = self.adapter_dir
        real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
        files = [os.path.realpath(os.path.join(real, f)) for f in (CONFIG_NAME, WEIGHTS_NAME)]
        if not _inside(real, root) or not all(_inside(f, root) for f in files):
            raise ValueError(f"IAPT adapter {name!r}: path {path!r} is outside the adapter directory")
        self.catalog.confine(real, root)  # and every later read of it is checked again
        return real

    def unregistered(self, name: str, next_id: Callable[[], int]) -> LoRARequest | None:
        """A request for run-time adapter ``name`` found in ``--iapt-adapter-dir`` but not
        registered (any more), or None. Under churn a resolver-loaded adapter can be
        unregistered to make room for another between a request's model check (which
        resolved it) and its adapter lookup; the request is then served from the
        directory exactly as the resolver would find it (confined to the directory, fully
        validated by the input processor), never answered 404."""
        if self.adapter_dir is None or not is_plain_name(name):
            return None
        path = os.path.join(self.adapter_dir, name)
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            return None
        try:
            real = self.runtime_path(name, path)
        except ValueError:
            return None
        return LoRARequest(lora_name=name, lora_int_id=next_id(), lora_path=real)  # new id, as the resolver gives

    async def validate(self, name: str, path: str) -> AdapterInfo:
        """Fully validates the adapter (off the event loop); AdapterError names it."""
        return await asyncio.to_thread(self.catalog.resolve, name, path)


class IAPTDirectoryResolver(LoRAResolver):
    """Maps an unknown plain model name ``x`` to ``<adapter_dir>/x`` if that is an
    IAPT adapter directory (like vLLM's filesystem LoRA resolver, which only
    accepts ``peft_type == "LORA"``). vLLM consults resolvers only when
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set."""

    def __init__(self, adapter_dir: str) -> None:
        self.adapter_dir = os.path.realpath(adapter_dir)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if not is_plain_name(lora_name):
            return None
        path = os.path.join(self.adapter_dir, lora_name)
        config = os.path.join(path, CONFIG_NAME)
        if not (os.path.isdir(path) and _inside(os.path.realpath(config), self.adapter_dir)):
            return None
        try:  # bounded, and confined on the open file (a symlink swapped in meanwhile is refused)
            _, data = await asyncio.to_thread(read_config_json, lora_name, config, self.adapter_dir)
            peft_type = data.get("peft_type")
        except (AdapterError, AttributeError):
            return None
        if peft_type != "IAPT":
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=path)


__all__ = ["AdapterError", "IAPTDirectoryResolver", "IAPTServing", "PLAIN_NAME", "RESOLVER_NAME", "is_plain_name"]
