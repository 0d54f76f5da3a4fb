"""Front-end side of a request: resolve its adapter, add the soft slots, hide them again.

Runs in the API-server / ``LLM`` process. A request whose ``lora_request`` points
at an IAPT adapter gets ``m`` placeholder ids prepended (the soft slots,
docs/iapt.md, section 2), its identity for prefix caching in ``cache_salt`` and the facts the
worker needs in ``sampling_params.extra_args["iapt"]`` (the only per-request
channels that survive vLLM's inter-process encoding). Outputs are stripped back
to the user's prompt before anybody sees them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from vllm_iapt.adapter import AdapterError, read_adapter
from vllm_iapt.engine.snapshots import SnapshotStore

#: Key of our entry in ``SamplingParams.extra_args``.
EXTRA_ARGS_KEY = "iapt"


@dataclass(frozen=True)
class AdapterInfo:
    """What the front end keeps of a validated adapter (no weights)."""

    name: str
    path: str  # the user's path (for messages and logs)
    num_soft_tokens: int
    content_hash: str
    snapshot: str  # the validated bytes, where the worker loads them from


class AdapterCatalog:
    """Validated adapter metadata, cached by path and file stamps.

    Every adapter is fully validated (config and every tensor, against the base
    model) the first time a request names it, so a bad adapter fails that
    request here, before it can reach the engine; the validated bytes are written
    to a content-addressed snapshot (:mod:`vllm_iapt.engine.snapshots`), which is
    all the worker ever reads. A file that changes on disk is validated again (a
    new snapshot for new content). Paths registered with :meth:`confine` are read
    only inside their root, checked on every read.
    """

    def __init__(self, hidden_size: int, num_hidden_layers: int, hit_unit: int, store: SnapshotStore,
                 capacity: int = 256) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.hit_unit = hit_unit  # see prefix_hit_unit
        self.store = store
        self.capacity = capacity
        self._cache: OrderedDict[tuple, AdapterInfo] = OrderedDict()
        self._roots: dict[str, str] = {}
        self._snapshots: dict[str, tuple | None] = {}  # snapshot path -> its files' stamp when written or checked
        self._lock = threading.Lock()

    @classmethod
    def for_engine(cls, vllm_config, cfg) -> "AdapterCatalog":
        text = vllm_config.model_config.hf_text_config
        return cls(text.hidden_size, text.num_hidden_layers, prefix_hit_unit(vllm_config.cache_config),
                   SnapshotStore(cfg.snapshot_dir, cfg.max_snapshot_bytes))

    def confine(self, path: str, root: str) -> None:
        """Reads of ``path`` (a run-time adapter) must stay inside ``root``."""
        with self._lock:
            self._roots[path] = os.path.realpath(root)
            if len(self._roots) > 4 * self.capacity:
                self._roots.pop(next(iter(self._roots)))

    @staticmethod
    def _stamp(path: str) -> tuple:
        out = [os.path.realpath(path)]
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            try:
                st = os.stat(os.path.join(path, f))
                out.append((st.st_mtime_ns, st.st_size, st.st_ino, os.path.realpath(os.path.join(path, f))))
            except OSError:
                out.append(None)
        return tuple(out)

    def resolve(self, name: str, path: str) -> AdapterInfo:
        key = self._stamp(path)
        with self._lock:
            info = self._cache.get(key)
            if info is not None:
                self._cache.move_to_end(key)
            root = self._roots.get(path)
        stamp = self.store.stamp(info.snapshot) if info is not None else None
        if stamp is not None and self._snapshots.get(info.snapshot) == stamp:  # the snapshot is as written
            self.store.touch(info.snapshot)
            return info if info.name == name else dataclasses.replace(info, name=name)
        adapter, weights = read_adapter(path, name=name, hidden_size=self.hidden_size,
                                        num_hidden_layers=self.num_hidden_layers, root=root)
        m = adapter.num_soft_tokens
        if m > self.hit_unit:
            # A prefix-cache hit ends on a multiple of the hit unit; with more slots
            # than that a hit could end inside them, and the generators cannot run
            # on half a prompt (the worker fails such a request: slots_guard.py).
            raise AdapterError(
                name, f"num_soft_tokens {m} exceeds the prefix-cache unit of this engine ({self.hit_unit} "
                "tokens: the KV cache block size, or prefix_match_unit / hash_block_size when finer), so a "
                "prefix-cache hit could end inside the soft slots; use a larger --block-size or "
                "--prefix-match-unit, or an adapter with fewer soft tokens")
        snapshot = self.store.put(adapter, weights)
        info = AdapterInfo(name, path, m, adapter.content_hash, snapshot)
        with self._lock:
            self._snapshots[snapshot] = self.store.stamp(snapshot)
            self._cache[key] = info
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            if len(self._snapshots) > 4 * self.capacity:
                live = {i.snapshot for i in self._cache.values()}
                self._snapshots = {k: v for k, v in self._snapshots.items() if k in live}
        return info


def prefix_hit_unit(cache_config) -> int:
    """The finest token boundary a prefix-cache hit can end on, as far as this
    process knows: the KV block size, or finer ``prefix_match_unit`` (the user's
    setting) / ``hash_block_size`` / ``cache_hit_alignment_tokens`` (resolved by
    the engine core after its KV-cache set-up; a front end in another process
    never receives them, vLLM 0.32 syncs only ``block_size``). vLLM computes block
    hashes every ``hash_block_size`` tokens and lands hits on multiples of
    ``cache_hit_alignment_tokens`` (a multiple of it), so ``m <= hash_block_size``
    keeps every hit either before the slots (none) or after all of them."""
    units = [getattr(cache_config, name, None) for name in
             ("block_size", "prefix_match_unit", "hash_block_size", "cache_hit_alignment_tokens")]
    known = [int(u) for u in units if u]
    return min(known) if known else 1


class SoftSlotError(ValueError):
    """A request IAPT cannot serve as given (the prompt cannot take the adapter's
    soft slots, or asks for something IAPT does not support): the client's
    mistake, so the OpenAI server answers 400 (see ``patches/serving.py``)."""


def prompt_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(b"".join(t.to_bytes(4, "little", signed=False) for t in token_ids)).hexdigest()


SALT_PREFIX = "iapt:"


def cache_salt(info: AdapterInfo, token_ids: list[int], user_salt: str | None) -> str:
    """Block 0's extra hash key. vLLM chains block hashes, so this key makes every
    block of the sequence specific to the adapter's *content* and to the *whole*
    instruction (docs/iapt.md, section 5); the user's own salt is kept inside it."""
    salt = f"{SALT_PREFIX}{info.content_hash}:{prompt_hash(token_ids)}"
    return salt if user_salt is None else f"{salt}:{user_salt}"


def with_soft_slots(
    info: AdapterInfo, prompt: dict[str, Any], placeholder_id: int, max_model_len: int
) -> dict[str, Any]:
    """A copy of a tokenized prompt (vLLM ``TokensInput``) with the soft slots
    prepended and the prefix-cache salt set."""
    if prompt.get("type") != "token" or "prompt_token_ids" not in prompt:
        raise SoftSlotError(f"IAPT adapter {info.name!r} supports token prompts only (text or token ids), "
                            f"not {prompt.get('type')!r} inputs")
    ids = list(prompt["prompt_token_ids"])
    if not ids:
        raise SoftSlotError(f"IAPT adapter {info.name!r}: the prompt is empty")
    m = info.num_soft_tokens
    if len(ids) + m >= max_model_len:
        raise SoftSlotError(
            f"prompt of {len(ids)} tokens plus the {m} soft tokens of IAPT adapter {info.name!r} "
            f"does not fit max_model_len={max_model_len} (need room for at least one generated token)")
    new = dict(prompt)
    new["prompt_token_ids"] = [placeholder_id] * m + ids
    new["cache_salt"] = cache_salt(info, ids, prompt.get("cache_salt"))
    return new


def extra_args(info: AdapterInfo) -> dict[str, Any]:
    """What the worker needs to find the adapter and the slots."""
    return {"m": info.num_soft_tokens, "content_hash": info.content_hash, "name": info.name,
            "path": info.snapshot, "source": info.path}


def iapt_entry(sampling_params: Any) -> dict[str, Any] | None:
    """The :func:`extra_args` a request carries (None without an IAPT adapter)."""
    return (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)


def soft_token_count(sampling_params: Any) -> int:
    """``m`` of a request (0 if it has no IAPT adapter)."""
    entry = iapt_entry(sampling_params)
    return int(entry["m"]) if entry else 0


def strip_prompt_logprobs(prompt_logprobs, m: int):
    """Prompt logprobs without the soft slots' rows: ``[None] + rows[m + 1:]``."""
    if not prompt_logprobs:
        return prompt_logprobs
    out = type(prompt_logprobs)()
    out.append(None)
    out.extend(prompt_logprobs[m + 1 :])
    return out
