"""Front-end side of a request: resolve its adapter, add the soft slots, hide them again.

Runs in the API-server / ``LLM`` process. A request whose ``lora_request`` points
at an IAPT adapter gets ``m`` placeholder ids prepended (the soft slots,
docs/iapt.md, section 2), its identity for prefix caching in ``cache_salt`` and the facts the
worker needs in ``sampling_params.extra_args["iapt"]`` (a typed
:class:`~vllm_iapt.engine.request_entry.IAPTEntry`; the only per-request channels
that survive vLLM's inter-process encoding). Outputs are stripped back to the
user's prompt before anybody sees them.

The front end's IAPT state is one :class:`IAPTFrontend` per engine client (vLLM's
``LLMEngine`` or ``AsyncLLM``), created with it (``patches/engine_client.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from vllm.utils.cache import LRUCache

from vllm_iapt.adapter import AdapterError, read_adapter
from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine.failures import FailureReasons
from vllm_iapt.engine.request_entry import EXTRA_ARGS_KEY, SALT_PREFIX, IAPTEntry
from vllm_iapt.engine.snapshots import TOUCH_INTERVAL_SECONDS, SnapshotStore
from vllm_iapt.serving import metrics


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
        self._cache: LRUCache[tuple, AdapterInfo] = LRUCache(capacity)  # by the files' stamp
        self._roots: LRUCache[str, str] = LRUCache(4 * capacity)  # run-time adapter path -> its root
        self._snapshots: dict[str, tuple | None] = {}  # snapshot path -> its files' stamp when written or checked
        self._lock = threading.Lock()

    @classmethod
    def for_engine(cls, vllm_config, cfg) -> "AdapterCatalog":
        text = vllm_config.model_config.hf_text_config
        # An entry is a few hundred bytes; a miss reads, validates and hashes the files again.
        return cls(text.hidden_size, text.num_hidden_layers, prefix_hit_unit(vllm_config.cache_config),
                   SnapshotStore(cfg.snapshot_dir, cfg.max_snapshot_bytes),
                   capacity=max(1024, 2 * cfg.max_runtime_adapters))

    def confine(self, path: str, root: str) -> None:
        """Reads of ``path`` (a run-time adapter) must stay inside ``root``."""
        with self._lock:
            self._roots[path] = os.path.realpath(root)

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

    def resolve(self, name: str, path: str, hold: bool = False) -> AdapterInfo:
        """The validated adapter at ``path``. With ``hold``, its snapshot is held for the
        request being accepted until the caller calls ``store.release(info.snapshot)``."""
        key = self._stamp(path)
        with self._lock:
            info = self._cache.get(key)
            root = self._roots.get(path)
            written = self._snapshots.get(info.snapshot) if info is not None else None
        if written is not None and self.store.use_if_intact(info.snapshot, written, hold):  # as written
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
        snapshot = self.store.put(adapter, weights, hold)
        info = AdapterInfo(name, path, m, adapter.content_hash, snapshot)
        with self._lock:
            self._snapshots[snapshot] = self.store.stamp(snapshot)
            self._cache[key] = info
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


#: An accepted request that never reaches the output processor stops holding its snapshot after this.
ACCEPT_TIMEOUT_SECONDS = 60.0


class SoftSlotError(ValueError):
    """A request IAPT cannot serve as given (the prompt cannot take the adapter's
    soft slots, or asks for something IAPT does not support): the client's
    mistake, so the OpenAI server answers 400 (see ``patches/engine_client.py``)."""


def prompt_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(b"".join(t.to_bytes(4, "little", signed=False) for t in token_ids)).hexdigest()


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


def request_entry(info: AdapterInfo) -> IAPTEntry:
    """What the engine core and the worker need to find the adapter and the slots."""
    return IAPTEntry(m=info.num_soft_tokens, content_hash=info.content_hash, name=info.name, path=info.snapshot,
                     source=info.path)


def strip_prompt_logprobs(prompt_logprobs, m: int):
    """Prompt logprobs without the soft slots' rows: ``[None] + rows[m + 1:]``."""
    if not prompt_logprobs:
        return prompt_logprobs
    out = type(prompt_logprobs)()
    out.append(None)
    out.extend(prompt_logprobs[m + 1 :])
    return out


#: What a request that reaches a stopping server is told (HTTP 503; patches/shutdown.py).
SHUTDOWN_MESSAGE = "the server is shutting down; send the request again (to another replica)"


def shutting_down() -> Exception:
    """The error for a request that arrives while the engine client stops: HTTP 503
    ``Service Unavailable``, which load balancers and OpenAI clients retry on another
    replica (vLLM's own admission control answers 503 for the same reason)."""
    from http import HTTPStatus

    from vllm.exceptions import GracefulHTTPError

    return GracefulHTTPError(SHUTDOWN_MESSAGE, HTTPStatus.SERVICE_UNAVAILABLE)


class IAPTFrontend:
    """The front end's IAPT state: one per engine client, created with vLLM's
    ``InputProcessor`` when IAPT is enabled (the one front-end object vLLM builds
    from the engine config, once per ``LLMEngine`` / ``AsyncLLM``).

    Its home is the input processor (``input_processor.iapt``); the engine client
    hands the same object to the other vLLM objects it owns whose patches need it
    (``output_processor.iapt`` and the renderer's tokenizer pool's ``iapt``, see
    :meth:`share`); the engine client and the OpenAI server reach it as
    ``engine.input_processor.iapt``. Nothing else in the front end keeps IAPT state.
    """

    def __init__(self, vllm_config: Any, cfg: IAPTEngineConfig) -> None:
        self.config = cfg
        #: Validated adapters (shared with the OpenAI server, which validates at load time).
        self.catalog = AdapterCatalog.for_engine(vllm_config, cfg)
        self.max_model_len: int = vllm_config.model_config.max_model_len
        self.model_name: str = vllm_config.model_config.served_model_name
        #: Reasons of requests a worker failed (vllm_iapt.engine.failures), by request id.
        self.failures = FailureReasons()
        #: The engine client has begun to shut down (patches/shutdown.py).
        self.stopping = False
        #: The OpenAI server's adapter registry (vllm_iapt.serving.models.IAPTServing), when there is one.
        self.serving: Any = None
        self._touched_in_flight = time.monotonic()
        #: Requests accepted (tagged) but maybe not yet in the output processor's
        #: request states: (EngineCoreRequest, snapshot, when), oldest first.
        self._accepted: deque[tuple[Any, str, float]] = deque()
        self._accepted_lock = threading.Lock()
        self._request_states: dict = {}  # the output processor's (set by share)

    @classmethod
    def for_config(cls, vllm_config: Any) -> "IAPTFrontend | None":
        """The state of a new input processor (None when IAPT is off)."""
        from vllm_iapt.engine.support import config_of

        cfg = config_of(vllm_config)
        return cls(vllm_config, cfg) if cfg is not None else None

    @staticmethod
    def of(engine: Any) -> "IAPTFrontend | None":
        """The state of an engine client (None when IAPT is off, or for an engine
        client that is not one of vLLM's)."""
        return getattr(getattr(engine, "input_processor", None), "iapt", None)

    @staticmethod
    def share(engine: Any) -> None:
        """Hands the input processor's state to the other objects a newly built engine
        client owns whose patches read it: its output processor and its renderer's
        tokenizer pool."""
        state = IAPTFrontend.of(engine)
        engine.output_processor.iapt = state
        pool = getattr(getattr(engine, "renderer", None), "_executor", None)  # the tokenizer pool (shutdown.py)
        if pool is not None:
            pool.iapt = state
        if state is not None:
            state._request_states = engine.output_processor.request_states
            state.catalog.store.in_use = state.in_flight_snapshots

    def with_soft_slots(self, prompt: Any, params: Any, lora_request: Any, resumable: bool) -> tuple[dict, AdapterInfo]:
        """The request's prompt with the adapter's soft slots and cache salt, and
        the validated adapter. Raises ``AdapterError`` / :class:`SoftSlotError`
        (the client's mistake: HTTP 400) naming the adapter."""
        if resumable:
            # A streaming-input session (AsyncLLM.generate with an input stream) sends
            # each chunk here; the scheduler appends it to the session's prompt, so
            # every chunk would bring its own soft slots, computed as plain tokens.
            raise SoftSlotError(
                f"IAPT adapter {lora_request.lora_name!r}: streaming-input (resumable) requests are not supported "
                "with IAPT adapters; send the whole prompt in one request")
        if not isinstance(prompt, dict):
            raise SoftSlotError("IAPT requests need a rendered prompt (use LLM.generate or the OpenAI server)")
        if getattr(params, "prompt_logprob_token_ids", None) is not None or getattr(params, "prompt_logprob_start", None):
            raise SoftSlotError("prompt_logprob_token_ids/prompt_logprob_start are not supported with IAPT adapters")
        # Held until tag() hands it to the request (or the caller releases it).
        info = self.catalog.resolve(lora_request.lora_name, lora_request.lora_path, hold=True)
        try:
            return with_soft_slots(info, prompt, self.config.placeholder_token_id, self.max_model_len), info
        except BaseException:
            self.catalog.store.release(info.snapshot)
            raise

    def tag(self, request: Any, lora_request: Any, info: AdapterInfo) -> Any:
        """Puts the adapter back on vLLM's ``EngineCoreRequest`` (the input processor
        ran with none, so that its "LoRA is not enabled" check passes) and adds the
        request's :class:`IAPTEntry`. The request now keeps its snapshot from being
        deleted (:meth:`in_flight_snapshots`)."""
        request.lora_request = lora_request
        sp = request.sampling_params
        sp.extra_args = {**(sp.extra_args or {}), EXTRA_ARGS_KEY: request_entry(info)}
        with self._accepted_lock:
            self._accepted.append((request, info.snapshot, time.monotonic()))
        return request

    def in_flight_snapshots(self) -> set[str]:
        """The snapshots of this engine client's requests in flight: accepted and not yet
        finished or aborted (a preempted request whose adapter left the worker's CPU
        cache loads it again). Accepted requests count until their output state exists
        (then that state counts), or for :data:`ACCEPT_TIMEOUT_SECONDS` if it never does
        (vLLM refused it after the input processor, e.g. admission control)."""
        states = self._request_states
        return self._prune_accepted() | {s.iapt.path for s in list(states.values()) if s.iapt is not None}

    def _prune_accepted(self) -> set[str]:
        """Drops the accepted requests now in the request states (or too old); returns
        the snapshots of the others."""
        states, now = self._request_states, time.monotonic()
        with self._accepted_lock:
            self._accepted = deque(entry for entry in self._accepted if entry[0].request_id not in states
                                   and now - entry[2] <= ACCEPT_TIMEOUT_SECONDS)
            return {path for _, path, _ in self._accepted}

    def before_outputs(self, engine_core_outputs: Any, request_states: dict) -> None:
        """A step's outputs, before vLLM's output processor handles them: the prefill
        statistics of IAPT requests lose their soft slots (vLLM's token counters count
        the user's tokens only), and the reasons of requests a worker failed are kept
        for the OpenAI server."""
        now = time.monotonic()
        if now - self._touched_in_flight >= TOUCH_INTERVAL_SECONDS:  # for the servers sharing the directory
            self._touched_in_flight = now
            for path in self.in_flight_snapshots():
                self.catalog.store.touch(path)
        elif self._accepted:
            self._prune_accepted()  # without scanning every request state each step
        for out in engine_core_outputs:
            request_state = request_states.get(out.request_id)
            if out.prefill_stats is not None and request_state is not None and request_state.iapt is not None:
                metrics.exclude_soft_slots(out.prefill_stats, request_state.iapt.m)
            if out.finish_reason is not None:
                self.failures.record(out, request_state)

    def admitted(self, lora_request: Any) -> None:
        """A request entered the engine: count it, and mark its adapter used."""
        name = lora_request.lora_name if lora_request is not None else None
        metrics.count_request(self.model_name, name)
        if name is not None and self.serving is not None:
            self.serving.touch(name)
