"""Every change vllm-iapt makes to vLLM's own behaviour, and nothing else, grouped by
the vLLM process that needs it.

One module per vLLM component; each module's docstring says what it changes, why,
how, which vLLM versions it was checked on, and what would let it go away upstream.
:data:`PATCHED_SYMBOLS` is the one table of every vLLM symbol they change (also in
docs/engine.md, "Patched vLLM symbols"). Every patch is a no-op unless IAPT is
enabled in that engine's ``additional_config``; IAPT's logic lives in ``vllm_iapt/``,
a patch only wires it in.

**Groups** (:data:`PATCH_GROUPS`), like vllm-ascend's ``patch/platform`` and
``patch/worker``:

* ``every process``: ``runner_choice`` (vLLM evaluates the model-runner choice in the
  front end, the engine core and the workers);
* ``frontend``, the API server or the process that runs ``LLM`` / ``AsyncLLM``:
  ``engine_args``, ``cli_args``, ``engine_client``, ``input_processor``,
  ``output_processor``, ``serving``, ``beam_search``, ``shutdown``, ``metrics``;
* ``engine_core``, the process that runs the scheduler: ``kv_cache_keys``,
  ``scheduler``;
* ``worker``, each process that runs a model runner: ``model_runner``,
  ``worker_memory``.

**Which process is which.** vLLM calls the plugin entry point
(``vllm_iapt.engine.plugin.register`` -> :func:`register`) once per process, from
whichever of its start-up points comes first there (``EngineArgs``, the CLI parser,
``EngineCore.__init__``, ``WorkerWrapperBase.init_worker``). A process may hold several
roles: an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) runs all three, an
engine core with a single-process executor runs its worker too. So:

* the front-end group is applied at registration unless vLLM started this process as
  an engine core or a worker: vLLM names those ``multiprocessing`` processes
  ``EngineCore`` / ``EngineCore_DP<n>`` and ``VllmWorker-<rank>``
  (:func:`is_engine_process`); every other process (``vllm serve``, ``ApiServer_<n>``,
  a user's program) may be a front end;
* the engine-core group is applied when the process builds an engine core's executor
  (``Executor.__init__``: ``EngineCore.__init__`` loads the plugins itself and then
  builds its executor first, in every layout), and the worker group when it builds a
  worker (``WorkerBase.__init__``, which every worker class runs after vLLM loaded the
  plugins). Both hooks receive the engine config, so with IAPT enabled they also
  refuse to start a role whose patches failed in this process.

A worker process therefore never imports the OpenAI server (``serving``), and the
API server never imports the GPU model runner (``model_runner``).

**Failures.** A patch that cannot be imported or applied (a vLLM whose internals
moved) never breaks vLLM for users who do not enable IAPT: the failure is recorded in
:data:`FAILED` and logged as a warning. With IAPT enabled, start-up refuses
(:func:`check_patches`: in the front end when the engine config is built, in the
engine core and the workers when their role starts, and by every other IAPT entry
point) with a message naming the vLLM version and the patches that failed *in that
process*, because IAPT with some patches missing would run wrong.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
from typing import Any, NamedTuple

logger = logging.getLogger("vllm.iapt")

EVERY_PROCESS = "every process"
FRONTEND = "frontend"
ENGINE_CORE = "engine_core"
WORKER = "worker"

#: Patch modules by the process role that needs them, each group applied in this
#: order. ``engine_args`` leads the front end: it is what refuses IAPT at start-up.
PATCH_GROUPS: dict[str, tuple[str, ...]] = {
    EVERY_PROCESS: ("runner_choice",),
    FRONTEND: ("engine_args", "cli_args", "engine_client", "input_processor", "output_processor", "serving",
               "beam_search", "shutdown", "metrics"),
    ENGINE_CORE: ("kv_cache_keys", "scheduler"),
    WORKER: ("model_runner", "worker_memory"),
}

#: vLLM's names for the ``multiprocessing`` processes it starts as engine cores and
#: workers (``vllm/v1/engine/utils.py``, ``vllm/v1/executor/multiproc_executor.py``).
ENGINE_PROCESS_PREFIXES = ("EngineCore", "VllmWorker")


class PatchedSymbol(NamedTuple):
    group: str
    module: str  # the patch module (patches/<module>.py)
    symbol: str  # the vLLM symbol, dotted from its module
    why: str
    goes_away_when: str
    upstream: str  # vLLM issue or PR, or "none known"


#: Every vLLM symbol vllm-iapt changes (wraps, or adds: the ``iapt`` attributes where
#: IAPT's state lives): one row each, every one changed by exactly one patch module
#: (``__init__`` is this module's role hooks). ``tests/test_patch_groups.py`` checks
#: this table against the installed wrappers; docs/engine.md shows it.
PATCHED_SYMBOLS: tuple[PatchedSymbol, ...] = (
    PatchedSymbol(EVERY_PROCESS, "__init__", "vllm.v1.executor.abstract.Executor.__init__",
                  "apply the engine-core group when the process builds an engine core's executor; refuse IAPT if "
                  "a patch failed in this process", "vLLM runs plugins per process role", "none known"),
    PatchedSymbol(EVERY_PROCESS, "__init__", "vllm.v1.worker.worker_base.WorkerBase.__init__",
                  "apply the worker group when the process builds a worker; refuse IAPT if a patch failed in this "
                  "process", "vLLM runs plugins per process role", "none known"),
    PatchedSymbol(EVERY_PROCESS, "runner_choice", "vllm.config.VllmConfig._get_v2_model_runner_unsupported_features",
                  "only model runner V1 publishes IAPT plans; V2 is vLLM's default wherever Triton works",
                  "IAPT runs on model runner V2", "none known"),
    PatchedSymbol(FRONTEND, "engine_args", "vllm.engine.arg_utils.EngineArgs.create_engine_config",
                  "validate the IAPT options; chunked prefill and async scheduling off; refuse what IAPT cannot "
                  "honour; refuse IAPT if a front-end patch failed",
                  "vLLM has a hook for out-of-tree engine options and per-request 'no chunking'", "none known"),
    PatchedSymbol(FRONTEND, "cli_args", "vllm.engine.arg_utils.EngineArgs.add_cli_args",
                  "the --enable-iapt / --iapt-* flags of vllm serve",
                  "vLLM lets plugins register CLI flags for additional_config",
                  "vllm-project/vllm#42318 (a plugin_config CLI namespace; closed, --additional-config advised)"),
    PatchedSymbol(FRONTEND, "cli_args", "vllm.engine.arg_utils.EngineArgs.from_cli_args",
                  "fold the flags into additional_config['iapt'] and --iapt-modules into lora_modules",
                  "as above", "vllm-project/vllm#42318"),
    PatchedSymbol(FRONTEND, "engine_client", "vllm.v1.engine.llm_engine.LLMEngine.__init__",
                  "hand the front end's IAPT state to the output processor and the tokenizer pool (LLM)",
                  "vLLM has per-engine plugin state", "none known"),
    PatchedSymbol(FRONTEND, "engine_client", "vllm.v1.engine.async_llm.AsyncLLM.__init__",
                  "the same for AsyncLLM (the OpenAI server)", "as above", "none known"),
    PatchedSymbol(FRONTEND, "engine_client", "vllm.v1.engine.async_llm.AsyncLLM.add_request",
                  "503 once stopping; adapter and soft-slot errors are 400, not 500; per-adapter request counts "
                  "and the run-time adapter LRU",
                  "vLLM answers requests during shutdown with 503 and has adapter kinds other than LoRA",
                  "vllm-project/vllm#24885 (RFC: shutdown semantics)"),
    PatchedSymbol(FRONTEND, "input_processor", "vllm.v1.engine.input_processor.InputProcessor.__init__",
                  "create the front end's IAPT state (home: input_processor.iapt)", "vLLM has per-engine plugin state",
                  "none known"),
    PatchedSymbol(FRONTEND, "input_processor", "vllm.v1.engine.input_processor.InputProcessor.iapt",
                  "(attribute, None by default) the home of the front end's IAPTFrontend",
                  "vLLM has per-engine plugin state", "none known"),
    PatchedSymbol(FRONTEND, "input_processor", "vllm.v1.engine.input_processor.InputProcessor.process_inputs",
                  "resolve and validate the adapter, prepend the soft slots, set the cache salt and the request's "
                  "IAPTEntry", "vLLM has a per-request adapter hook in the input processor",
                  "vllm-project/vllm#20588 (prompt adapters removed with V0)"),
    PatchedSymbol(FRONTEND, "output_processor", "vllm.v1.engine.output_processor.RequestState.from_new_request",
                  "outputs are built from the user's prompt, without the soft slots",
                  "vLLM supports per-request virtual prompt tokens", "none known"),
    PatchedSymbol(FRONTEND, "output_processor", "vllm.v1.engine.output_processor.RequestState._new_request_output",
                  "prompt_logprobs and num_cached_tokens without the slots", "as above", "none known"),
    PatchedSymbol(FRONTEND, "output_processor", "vllm.v1.engine.output_processor.RequestState.iapt",
                  "(attribute, None by default) a request's IAPTEntry in the front end",
                  "vLLM supports per-request virtual prompt tokens", "none known"),
    PatchedSymbol(FRONTEND, "output_processor", "vllm.v1.engine.output_processor.OutputProcessor.iapt",
                  "(attribute, None by default) the engine client's IAPTFrontend",
                  "vLLM has per-engine plugin state", "none known"),
    PatchedSymbol(FRONTEND, "output_processor", "vllm.v1.engine.output_processor.OutputProcessor.process_outputs",
                  "prefill statistics without the slots; keep the reason of requests a worker failed",
                  "as above, and vLLM lets a model runner fail single requests with a reason", "none known"),
    PatchedSymbol(FRONTEND, "serving", "vllm.entrypoints.openai.models.serving.OpenAIServingModels.__init__",
                  "the server's adapter registry; only IAPT's directory resolver",
                  "vLLM has adapter kinds other than LoRA in its serving layer", "none known"),
    PatchedSymbol(FRONTEND, "serving", "vllm.entrypoints.openai.models.serving.OpenAIServingModels.init_static_loras",
                  "--iapt-modules are validated in the API server (add_lora needs vLLM LoRA)", "as above",
                  "none known"),
    PatchedSymbol(FRONTEND, "serving", "vllm.entrypoints.openai.models.serving.OpenAIServingModels.load_lora_adapter",
                  "run-time loads validated and confined to --iapt-adapter-dir, errors are 400", "as above",
                  "none known"),
    PatchedSymbol(FRONTEND, "serving",
                  "vllm.entrypoints.openai.models.serving.OpenAIServingModels.unload_lora_adapter",
                  "keep the run-time adapter registry in step", "as above", "none known"),
    PatchedSymbol(FRONTEND, "serving", "vllm.entrypoints.openai.models.serving.OpenAIServingModels.resolve_lora",
                  "resolve unknown names in --iapt-adapter-dir only, within max_runtime_adapters", "as above",
                  "none known"),
    PatchedSymbol(FRONTEND, "serving", "vllm.entrypoints.serve.engine.serving.BaseServing._maybe_get_adapters",
                  "a request whose resolver-loaded adapter was unregistered (registry churn) after its model "
                  "check is served from --iapt-adapter-dir, not answered 404", "as above", "none known"),
    PatchedSymbol(FRONTEND, "serving", "vllm.entrypoints.generate.base.serving.GenerateBaseServing._raise_if_error",
                  "a request whose adapter failed in the worker is answered with the reason",
                  "vLLM reports per-request failure reasons", "none known"),
    PatchedSymbol(FRONTEND, "beam_search",
                  "vllm.entrypoints.generate.beam_search.offline.BeamSearchOfflineMixin.beam_search",
                  "refuse adapter requests: beam search resubmits generated text as the prompt",
                  "beam search forks sequences inside the engine",
                  "vllm-project/vllm#8726 (beam search rebuilt on top of the engine, by resubmitting)"),
    PatchedSymbol(FRONTEND, "beam_search",
                  "vllm.entrypoints.generate.beam_search.online.BeamSearchOnlineMixin.beam_search",
                  "the same for the OpenAI server (use_beam_search)", "as above", "vllm-project/vllm#8726"),
    PatchedSymbol(FRONTEND, "shutdown", "vllm.v1.engine.async_llm.AsyncLLM.shutdown",
                  "mark the front end stopping before vLLM shuts the tokenizer pool",
                  "vLLM answers requests that arrive during its shutdown with 503", "vllm-project/vllm#24885"),
    PatchedSymbol(FRONTEND, "shutdown", "vllm.renderers.base._SwappableExecutor.iapt",
                  "(attribute, None by default) the engine client's IAPTFrontend, for the stopping flag",
                  "as for AsyncLLM.shutdown", "vllm-project/vllm#24885"),
    PatchedSymbol(FRONTEND, "shutdown", "vllm.renderers.base._SwappableExecutor.submit",
                  "a request tokenized by a stopped pool gets 503, not 500", "as above", "vllm-project/vllm#24885"),
    PatchedSymbol(FRONTEND, "cli_args", "vllm.entrypoints.cli.serve.ServeSubcommand.validate",
                  "one API server by default with run-time loading, which vLLM refuses with several (its default "
                  "under --data-parallel-size N)", "vLLM defaults to one API server when run-time loading is on",
                  "none known"),
    PatchedSymbol(FRONTEND, "metrics", "vllm.v1.metrics.loggers.PrometheusStatLogger.__init__",
                  "vllm:lora_requests_info (what adapter-aware routers read) lists IAPT adapters",
                  "vLLM publishes adapter metrics for adapter kinds other than LoRA", "none known"),
    PatchedSymbol(ENGINE_CORE, "kv_cache_keys", "vllm.v1.core.kv_cache_utils._gen_lora_extra_hash_keys",
                  "IAPT blocks are keyed by adapter content (the cache salt), not by name and path",
                  "vLLM hashes per-request adapters by content",
                  "vllm-project/vllm#27211 (the LoRA name in block hashes), vllm-project/vllm#42125 (same-name "
                  "reload reuses stale blocks)"),
    PatchedSymbol(ENGINE_CORE, "scheduler", "vllm.v1.core.sched.scheduler.Scheduler.update_from_output",
                  "finish the requests a worker failed with FINISHED_ERROR, alone, and evict their blocks",
                  "vLLM lets a model runner fail single requests", "none known"),
    PatchedSymbol(ENGINE_CORE, "scheduler", "vllm.v1.core.sched.scheduler.Scheduler.iapt",
                  "(attribute, None by default) the scheduler's PrefillAdmission",
                  "vLLM's scheduler caps adapters starting a prefill per step", "none known"),
    PatchedSymbol(ENGINE_CORE, "scheduler", "vllm.v1.core.sched.scheduler.Scheduler.__init__",
                  "creates the PrefillAdmission when IAPT is on",
                  "vLLM's scheduler caps adapters starting a prefill per step", "none known"),
    PatchedSymbol(ENGINE_CORE, "scheduler", "vllm.v1.core.sched.scheduler.Scheduler.schedule",
                  "a new step: the admission's count of adapters starting a prefill starts at 0; adapters seen "
                  "first in the step are announced to the workers on its SchedulerOutput (read ahead)",
                  "vLLM's scheduler caps adapters starting a prefill per step", "none known"),
    PatchedSymbol(ENGINE_CORE, "scheduler",
                  "vllm.v1.core.sched.scheduler.Scheduler._handle_blocked_waiting_request",
                  "a waiting request whose adapter is seen first (read ahead) or is one too many for this step's "
                  "reserved memory waits a step",
                  "vLLM's scheduler caps adapters starting a prefill per step", "none known"),
    PatchedSymbol(WORKER, "model_runner", "vllm.v1.worker.gpu_worker.Worker.load_model",
                  "the worker's IAPT state: soft-row op in the decoder layers, checks",
                  "vLLM has a per-step hook for per-request model metadata", "none known"),
    PatchedSymbol(WORKER, "model_runner", "vllm.v1.worker.gpu_model_runner.GPUModelRunner.iapt",
                  "(attribute, None by default) the home of the worker's IAPTWorkerState",
                  "vLLM has a per-step hook for per-request model metadata", "none known"),
    PatchedSymbol(WORKER, "model_runner", "vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs",
                  "build the step's plan; hide the slots from the penalties", "as above", "none known"),
    PatchedSymbol(WORKER, "model_runner",
                  "vllm.v1.worker.gpu_model_runner.GPUModelRunner._determine_batch_execution_and_padding",
                  "IAPT requests are not LoRA to the CUDA-graph dispatcher; no FULL graph for a planned step",
                  "as above", "none known"),
    PatchedSymbol(WORKER, "model_runner", "vllm.v1.worker.gpu_model_runner.GPUModelRunner._model_forward",
                  "publish the plan into the forward context", "as above", "none known"),
    PatchedSymbol(WORKER, "model_runner", "vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens",
                  "the step's failed requests ride on its ModelRunnerOutput to the scheduler",
                  "vLLM lets a model runner fail single requests", "none known"),
    PatchedSymbol(WORKER, "model_runner", "vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model",
                  "start reading the adapters the scheduler announced on the step (read ahead); drop a plan no "
                  "forward published (dummy and profiling runs)", "as for _prepare_inputs",
                  "none known"),
    PatchedSymbol(WORKER, "worker_memory", "vllm.v1.worker.gpu_worker.Worker.determine_available_memory",
                  "IAPT's device memory is taken out of the KV cache before vLLM sizes it",
                  "vLLM lets a plugin reserve device memory outside the model's profile", "none known"),
    PatchedSymbol(WORKER, "worker_memory", "vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory",
                  "the same for the CPU worker (vLLM's CPU platform only)", "as above", "none known"),
)

#: Patch module (or role hook) -> "ExceptionType: message", for everything that failed in this process.
FAILED: dict[str, str] = {}
#: The groups applied in this process.
APPLIED: set[str] = set()

_registered = False


class PatchError(RuntimeError):
    """IAPT was enabled, but some of vllm-iapt's patches could not be applied to
    this vLLM in this process."""


def register() -> None:
    """The plugin's work in a process, once: the patches every process needs, the
    front end's if this may be a front end, and the hooks that apply the engine
    core's and the worker's when this process takes on those roles."""
    global _registered
    if _registered:
        return
    _registered = True
    apply_group(EVERY_PROCESS)
    if not is_engine_process():
        apply_group(FRONTEND)
    _install_role_hooks()


def is_engine_process(process_name: str | None = None) -> bool:
    """True in a process vLLM started as an engine core or a worker (never a front end)."""
    name = multiprocessing.current_process().name if process_name is None else process_name
    return name.startswith(ENGINE_PROCESS_PREFIXES)


def apply_group(group: str) -> None:
    """Applies each patch module of ``group`` on its own, once per process; failures
    go to :data:`FAILED`."""
    if group in APPLIED:
        return
    APPLIED.add(group)
    for name in PATCH_GROUPS[group]:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            module.apply()
        except ModuleNotFoundError as e:  # noqa: PERF203
            if e.name == f"{__name__}.{name}":
                FAILED[name] = (f"ModuleNotFoundError: patch module patches/{name}.py is registered in the "
                                f"{group!r} group of patches/__init__.py but is not installed")
            else:
                FAILED[name] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - anything here must not break plain vLLM
            FAILED[name] = f"{type(e).__name__}: {e}"
    logger.debug("vllm-iapt: %s patches applied in process %s", group, multiprocessing.current_process().name)
    _warn(group, [n for n in PATCH_GROUPS[group] if n in FAILED])
    if group == FRONTEND and "engine_args" in FAILED:
        _fallback_guard()


def _warn(group: str, failed: list[str]) -> None:
    if failed:
        logger.warning(
            "vllm-iapt could not patch vLLM %s (%s patches: %s); vLLM works as usual, but starting an engine with "
            "IAPT enabled will be refused", _vllm_version(), group, "; ".join(f"{k}: {FAILED[k]}" for k in failed))


def _install_role_hooks() -> None:
    """Applies the engine-core and worker groups when this process starts those
    roles, and refuses the role if IAPT is enabled but a patch failed here."""
    hooks = ((ENGINE_CORE, "vllm.v1.executor.abstract", "Executor"),
             (WORKER, "vllm.v1.worker.worker_base", "WorkerBase"))
    for group, module_name, class_name in hooks:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
            _hook_role(cls, group)
        except Exception as e:  # noqa: BLE001 - anything here must not break plain vLLM
            key = f"{group} role hook ({module_name}.{class_name}.__init__)"
            FAILED[key] = f"{type(e).__name__}: {e}"
            _warn("role hook", [key])


def _hook_role(cls: type, group: str) -> None:
    original = cls.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        apply_group(group)
        if _iapt_enabled(vllm_config):
            check_patches()
        original(self, vllm_config, *args, **kwargs)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__init__ = __init__


def _iapt_enabled(vllm_config: Any) -> bool:
    from vllm_iapt.engine.support import config_of

    return config_of(vllm_config) is not None


def check_patches() -> None:
    """Raises :class:`PatchError` if any patch failed in this process (call it
    only when IAPT is enabled)."""
    if FAILED:
        from vllm_iapt.engine.support import CHECKED_VLLM_VERSIONS

        raise PatchError(
            f"IAPT cannot run on vLLM {_vllm_version()}: vllm-iapt's patches "
            f"{', '.join(sorted(FAILED))} could not be applied in this process "
            f"({multiprocessing.current_process().name}; groups {', '.join(sorted(APPLIED))}) ("
            + "; ".join(f"{k}: {v}" for k, v in sorted(FAILED.items()))
            + f"). vllm-iapt was checked on vLLM {', '.join(CHECKED_VLLM_VERSIONS)}; install that version "
            "(pip install -e . pins it) or see docs/engine.md, 'Supporting a new vLLM version'.")


def _vllm_version() -> str:
    try:
        from vllm_iapt.engine.support import vllm_version

        return vllm_version()
    except Exception:  # noqa: BLE001
        return "unknown"


def _fallback_guard() -> None:
    """``engine_args`` failed, so nothing refuses IAPT at config time: wrap the
    engine-config constructor as simply as possible so that an IAPT config is
    refused there (the role hooks, the worker and the CLI check too)."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        original = EngineArgs.create_engine_config

        def create_engine_config(self, *args, **kwargs):
            if "iapt" in (getattr(self, "additional_config", None) or {}):
                check_patches()
            return original(self, *args, **kwargs)

        EngineArgs.create_engine_config = create_engine_config
    except Exception as e:  # noqa: BLE001
        logger.warning("vllm-iapt: the fallback start-up guard could not be installed either (%s)", e)
