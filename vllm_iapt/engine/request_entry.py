"""What travels with an IAPT request from the front end to the engine core and the workers.

The front end puts one :class:`IAPTEntry` into the request's
``sampling_params.extra_args["iapt"]`` (:mod:`vllm_iapt.engine.frontend`), and sets
the request's ``cache_salt`` to ``iapt:<content hash>:<prompt hash>[:<user salt>]``
(:data:`SALT_PREFIX`). Those are the only per-request channels that survive vLLM's
inter-process encoding. vLLM encodes ``extra_args`` with msgpack as an untyped map,
so another process receives a plain dict; :func:`iapt_entry` turns it back into
the typed entry (once: the typed entry replaces the dict in ``extra_args``).

Kept free of heavy imports: the engine core (block hashing) and the workers (the
step plan) read it.
"""

from __future__ import annotations

from typing import Any

import msgspec

#: Key of the entry in ``SamplingParams.extra_args``.
EXTRA_ARGS_KEY = "iapt"

#: Start of the cache salt of every IAPT request (block 0's extra hash key).
SALT_PREFIX = "iapt:"


class IAPTEntry(msgspec.Struct, frozen=True):
    """One request's IAPT adapter, as the engine core and the workers need it."""

    m: int  # soft slots prepended to the prompt (the adapter's num_soft_tokens)
    content_hash: str  # the adapter's content (what the KV cache and the worker's caches are keyed by)
    name: str  # the adapter's name (messages)
    path: str  # the validated snapshot the worker loads (vllm_iapt.engine.snapshots)
    source: str | None = None  # the user's path (messages)


def iapt_entry(sampling_params: Any) -> IAPTEntry | None:
    """The request's entry, or None when it has no IAPT adapter. Raises a
    ``msgspec.ValidationError`` for an ``extra_args["iapt"]`` of the wrong shape."""
    extra = getattr(sampling_params, "extra_args", None)
    if not extra:
        return None
    raw = extra.get(EXTRA_ARGS_KEY)
    if raw is None or isinstance(raw, IAPTEntry):
        return raw
    entry = msgspec.convert(raw, IAPTEntry)
    extra[EXTRA_ARGS_KEY] = entry  # decoded once per process
    return entry


def soft_token_count(sampling_params: Any) -> int:
    """``m`` of a request (0 if it has no IAPT adapter)."""
    entry = iapt_entry(sampling_params)
    return entry.m if entry is not None else 0
