"""Test-only fault injection for one tensor-parallel rank.

Put this directory on ``PYTHONPATH`` and set ``IAPT_TEST_FAIL_LOAD_ON_RANK=RANK:NAME``:
every process of the engine then imports this module at start-up (Python's
``sitecustomize``), and the worker of tensor-parallel rank RANK fails to load the
adapter named NAME, as if its snapshot were unreadable on that node only. The
other ranks load it normally.
"""

import os

_spec = os.environ.get("IAPT_TEST_FAIL_LOAD_ON_RANK")
if _spec:
    _rank, _name = _spec.split(":", 1)

    from vllm_iapt.adapter import AdapterError
    from vllm_iapt.engine.adapter_manager import IAPTAdapterManager

    _load = IAPTAdapterManager._load_cpu

    def _load_cpu(self, content_hash, name, path):
        from vllm.distributed import get_tensor_model_parallel_rank

        if name == _name and get_tensor_model_parallel_rank() == int(_rank):
            raise AdapterError(name, f"injected load failure on tensor-parallel rank {_rank}")
        return _load(self, content_hash, name, path)

    IAPTAdapterManager._load_cpu = _load_cpu
