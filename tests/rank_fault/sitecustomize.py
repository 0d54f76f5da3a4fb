"""Test-only fault injection for one tensor-parallel rank or pipeline stage.

Put this directory on ``PYTHONPATH`` and set ``IAPT_TEST_FAIL_LOAD_ON_RANK=RANK:NAME``
(tensor-parallel rank) or ``IAPT_TEST_FAIL_LOAD_ON_STAGE=STAGE:NAME[,STAGE:NAME...]``
(pipeline stage): every process of the engine then imports this module at start-up
(Python's ``sitecustomize``), and the worker of that rank or stage fails to load the
adapter named NAME, as if its snapshot were unreadable on that node only. The other
ranks load it normally.
"""

import os

_faults = []
if os.environ.get("IAPT_TEST_FAIL_LOAD_ON_RANK"):
    _rank, _name = os.environ["IAPT_TEST_FAIL_LOAD_ON_RANK"].split(":", 1)
    _faults.append(("tensor-parallel rank", int(_rank), _name))
for _spec in filter(None, os.environ.get("IAPT_TEST_FAIL_LOAD_ON_STAGE", "").split(",")):
    _stage, _name = _spec.split(":", 1)
    _faults.append(("pipeline stage", int(_stage), _name))

if _faults:
    from vllm_iapt.adapter import AdapterError
    from vllm_iapt.engine.adapter_manager import IAPTAdapterManager

    _load = IAPTAdapterManager._load_cpu

    def _load_cpu(self, content_hash, name, path):
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        for kind, index, target in _faults:
            here = get_tensor_model_parallel_rank() if kind.startswith("tensor") else get_pp_group().rank_in_group
            if name == target and here == index:
                raise AdapterError(name, f"injected load failure on {kind} {index}")
        return _load(self, content_hash, name, path)

    IAPTAdapterManager._load_cpu = _load_cpu
