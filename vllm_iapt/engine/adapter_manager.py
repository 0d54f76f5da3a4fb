"""Worker side: adapter weights in a device LRU backed by a CPU LRU.

Adapters are keyed by content hash (what the front end validated), never by
name or id, so reloading a name with new weights can never reuse old weights.
Only prefill steps ask for weights; decoding never touches this manager.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from vllm_iapt.adapter import AdapterError, IAPTAdapter, load_adapter
from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.generator import GeneratorWeights

logger = logging.getLogger(__name__)

#: Per layer: the generator's weights on the device, or None if the layer has none.
DeviceAdapter = list[GeneratorWeights | None]


class IAPTAdapterManager:
    def __init__(self, config: IAPTEngineConfig, device: torch.device, hidden_size: int, num_hidden_layers: int) -> None:
        self.config = config
        self.device = device
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self._cpu: OrderedDict[str, IAPTAdapter] = OrderedDict()
        self._device: OrderedDict[str, DeviceAdapter] = OrderedDict()
        self.num_uploads = 0  # device LRU misses, for tests and metrics

    def _load_cpu(self, content_hash: str, name: str, path: str) -> IAPTAdapter:
        adapter = self._cpu.get(content_hash)
        if adapter is not None:
            self._cpu.move_to_end(content_hash)
            return adapter
        adapter = load_adapter(path, name=name, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers)
        if adapter.content_hash != content_hash:
            # The files changed between the front end's validation and this load.
            raise AdapterError(name, f"files at {path!r} changed after the request was accepted")
        self._cpu[content_hash] = adapter
        while len(self._cpu) > self.config.max_cpu_adapters:
            self._cpu.popitem(last=False)
        return adapter

    def get(self, content_hash: str, name: str, path: str) -> DeviceAdapter:
        weights = self._device.get(content_hash)
        if weights is not None:
            self._device.move_to_end(content_hash)
            return weights
        adapter = self._load_cpu(content_hash, name, path)
        weights = [None] * self.num_hidden_layers
        for layer in adapter.config.generator_layers:
            weights[layer] = adapter.layer_weights(layer).to(self.device, torch.float32)
        self._device[content_hash] = weights
        self.num_uploads += 1
        return weights

    def trim(self) -> None:
        """Evict device-resident adapters beyond ``max_adapters`` (after a step
        that needed more than that at once)."""
        while len(self._device) > self.config.max_adapters:
            self._device.popitem(last=False)

    def resident(self) -> list[str]:
        return list(self._device)
