"""Worker side: adapter weights in a device LRU backed by a CPU LRU.

Adapters are keyed by content hash (what the front end validated), never by
name or id, so reloading a name with new weights can never reuse old weights.
They are loaded only from the front end's content-addressed snapshots
(:mod:`vllm_iapt.engine.snapshots`), confined to the snapshot directory, and the
content hash is checked again. Only prefill steps ask for weights; decoding never
touches this manager.

The CPU cache is bounded in count (``max_cpu_adapters``) and in bytes
(``max_cpu_adapter_bytes``). A load that fails is recorded against the requests
that needed it (:meth:`record_failures`); ``patches/request_failures.py`` finishes
those requests with an error and the engine keeps running.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

from vllm_iapt.adapter import AdapterError, IAPTAdapter, load_adapter
from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine.snapshots import is_snapshot_path, snapshot_root
from vllm_iapt.generator import GeneratorWeights

logger = logging.getLogger("vllm.iapt")

#: Per layer: the generator's weights on the device, or None if the layer has none.
DeviceAdapter = list[GeneratorWeights | None]


class IAPTAdapterManager:
    def __init__(self, config: IAPTEngineConfig, device: torch.device, hidden_size: int, num_hidden_layers: int) -> None:
        self.config = config
        self.device = device
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.snapshot_root = snapshot_root(config.snapshot_dir)
        self._cpu: OrderedDict[str, IAPTAdapter] = OrderedDict()
        self._cpu_bytes = 0
        self._device: OrderedDict[str, DeviceAdapter] = OrderedDict()
        self._failures: dict[str, str] = {}  # request id -> reason, until taken
        #: content hash -> reason of its last failed load (cleared by a successful one)
        self.failed_hashes: dict[str, str] = {}
        self.num_uploads = 0  # device LRU misses, for tests and metrics

    def _load_cpu(self, content_hash: str, name: str, path: str) -> IAPTAdapter:
        adapter = self._cpu.get(content_hash)
        if adapter is not None:
            self._cpu.move_to_end(content_hash)
            return adapter
        if not is_snapshot_path(path, self.snapshot_root) or os.path.basename(path) != content_hash:
            raise AdapterError(name, f"{path!r} is not a snapshot in this engine's snapshot directory "
                               f"{self.snapshot_root!r}")
        adapter = load_adapter(path, name=name, hidden_size=self.hidden_size,
                               num_hidden_layers=self.num_hidden_layers, root=self.snapshot_root)
        if adapter.content_hash != content_hash:
            raise AdapterError(name, f"snapshot {path!r} does not hold the content that was accepted")
        size = adapter.num_bytes()
        if size <= self.config.max_cpu_adapter_bytes:  # larger: used for this step, not kept
            self._cpu[content_hash] = adapter
            self._cpu_bytes += size
            while len(self._cpu) > self.config.max_cpu_adapters or self._cpu_bytes > self.config.max_cpu_adapter_bytes:
                _, evicted = self._cpu.popitem(last=False)
                self._cpu_bytes -= evicted.num_bytes()
        return adapter

    def get(self, content_hash: str, name: str, path: str) -> DeviceAdapter:
        weights = self._device.get(content_hash)
        if weights is not None:
            self._device.move_to_end(content_hash)
            return weights
        adapter = self._load_cpu(content_hash, name, path)
        weights = [None] * self.num_hidden_layers
        for layer in adapter.config.generator_layers:
            # float32, as views of two buffers per layer: the soft-row op batches adapters by
            # concatenating those buffers (vllm_iapt.generator.generate_grouped)
            weights[layer] = adapter.layer_weights(layer).flattened(self.device)
        self._device[content_hash] = weights
        self.failed_hashes.pop(content_hash, None)
        self.num_uploads += 1
        return weights

    def trim(self) -> None:
        """Evict device-resident adapters beyond ``max_adapters`` (after a step
        that needed more than that at once)."""
        while len(self._device) > self.config.max_adapters:
            self._device.popitem(last=False)

    def resident(self) -> list[str]:
        return list(self._device)

    def cpu_bytes(self) -> int:
        return self._cpu_bytes

    # -- failures -----------------------------------------------------------

    def record_failures(self, failures: dict[str, str], content_hash: str | None = None) -> None:
        """``failures``: request id -> reason. With ``content_hash``, later prefills
        that reuse that adapter's cached blocks fail too until a load succeeds."""
        self._failures.update(failures)
        if content_hash is not None and failures:
            self.failed_hashes[content_hash] = next(iter(failures.values()))
            while len(self.failed_hashes) > 1024:
                self.failed_hashes.pop(next(iter(self.failed_hashes)))

    def has_failures(self) -> bool:
        return bool(self._failures)

    def take_failures(self) -> dict[str, str]:
        out, self._failures = self._failures, {}
        return out
