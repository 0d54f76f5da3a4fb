"""Worker side: adapter weights in a device LRU backed by a CPU LRU.

Adapters are keyed by content hash (what the front end validated), never by
name or id, so reloading a name with new weights can never reuse old weights.
They are loaded only from the front end's content-addressed snapshots
(:mod:`vllm_iapt.engine.snapshots`), confined to the snapshot directory, and the
content hash is checked again. Only prefill steps ask for weights; decoding never
touches this manager.

An adapter the scheduler announces (its first request waits one step for it,
:mod:`vllm_iapt.engine.admission`) is read, checked and packed by a background thread
while that step runs (:meth:`IAPTAdapterManager.read_ahead`), so the step that starts
its request finds it in host memory; an adapter that was not announced, or was
evicted since, is read inside the step that needs it.

The CPU cache keeps each adapter as this rank's generators packed in one float32
buffer (:class:`~vllm_iapt.generator.PackedGenerators`, pinned on a GPU), so a device
miss is one asynchronous copy, and none on a CPU device. It is bounded in bytes
(``max_cpu_adapter_bytes``) and, if set, in count (``max_cpu_adapters``). The device cache is bounded in count
(``max_adapters``, trimmed after each step) and in bytes: the device memory IAPT
reserved from the KV cache (:mod:`vllm_iapt.engine.memory`, set by
``patches/worker_memory.py`` through :meth:`configure_memory`). An adapter enters a
step only if the step's adapters, their generators' working memory at
``max_num_batched_tokens`` rows and the resident adapters the step does not use
fit in it; unused resident adapters are evicted (least recently used first) to make
room. A step whose adapters still do not fit together runs anyway, over the
reservation for that step (counted in ``num_over_budget``, logged): a valid request
never fails because other tenants share its step, and the scheduler keeps such steps
rare by admitting at most ``2 x max_adapters`` adapters into one step
(:mod:`vllm_iapt.engine.admission`). An adapter too large for the reservation even
alone is refused (its requests fail, naming the setting). A load that
fails is recorded against the requests that needed it (:meth:`record_failures`);
``vllm_iapt/engine/failures.py`` finishes those requests with an error and the
engine keeps running.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from vllm.utils.cache import LRUCache
from vllm.utils.platform_utils import is_pin_memory_available

from vllm_iapt.adapter import AdapterError, load_adapter
from vllm_iapt.config import IAPTEngineConfig
from vllm_iapt.engine import memory
from vllm_iapt.engine.snapshots import is_snapshot_path, snapshot_root
from vllm_iapt.generator import GeneratorWeights, PackedGenerators

logger = logging.getLogger("vllm.iapt")

#: The flag of ``max_device_adapter_bytes`` (named in messages).
_FLAG = "--iapt-max-device-adapter-bytes"

#: Most reads ahead in flight or done and not yet used; further announcements are read
#: when their requests are scheduled.
MAX_READ_AHEAD = 64

#: Per layer: the generator's weights on the device, or None if the layer has none.
DeviceAdapter = list[GeneratorWeights | None]


@dataclass(frozen=True)
class HostAdapter:
    """A validated adapter in host memory, ready to upload: this rank's generators
    packed in one float32 buffer (pinned when the device is a GPU)."""

    shape: memory.AdapterShape
    packed: PackedGenerators

    def nbytes(self) -> int:
        return self.packed.nbytes()


class IAPTAdapterManager:
    def __init__(self, config: IAPTEngineConfig, device: torch.device, hidden_size: int, num_hidden_layers: int,
                 layers: set[int] | None = None) -> None:
        self.config = config
        self.device = device
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        #: The decoder layers this rank runs (a pipeline-parallel stage holds a
        #: range); only their generators go to the device. None: all of them.
        #: Device budgets still count every layer, which over-reserves on a stage.
        self.layers = layers
        self.snapshot_root = snapshot_root(config.snapshot_dir)
        #: content hash -> adapter in host memory, bounded in bytes (and in count if
        #: max_cpu_adapters is set, see _load_cpu)
        self._cpu: LRUCache[str, HostAdapter] = LRUCache(config.max_cpu_adapter_bytes,
                                                         getsizeof=lambda adapter: adapter.nbytes())
        self._pin = device.type == "cuda" and is_pin_memory_available()
        #: content hash -> device weights; the step's adapters are pinned while it is planned
        #: (evictions to make room skip them), the count bound is applied by :meth:`trim`
        self._device: LRUCache[str, DeviceAdapter] = LRUCache(float("inf"))
        self._shapes: dict[str, memory.AdapterShape] = {}  # of the device-resident adapters
        #: The adapters admitted into the step being planned (cleared by :meth:`trim`).
        self._step: dict[str, memory.AdapterShape] = {}
        self._no_room: set[str] = set()  # adapters just refused for lack of device memory
        #: What bounds a step (None until configure_memory: then only weights count).
        self.limits: memory.StepLimits | None = None
        #: Device bytes for adapters, weights and working memory (None: unbounded).
        self.budget: int | None = config.max_device_adapter_bytes
        self._failures: dict[str, str] = {}  # request id -> reason, until taken
        #: Pipeline parallel: the step's adapters as (content hash, loaded here, entry,
        #: request ids), for the stages' agreement after the forward (plan.agree_across_stages).
        self.stage_check: list[tuple] | None = None
        #: content hash -> reason of its last failed load (cleared by a successful one)
        self.failed_hashes: LRUCache[str, str] = LRUCache(1024)
        #: content hash -> its read ahead (a background thread, started lazily)
        self._reading: dict[str, Future[HostAdapter]] = {}
        self._reader: ThreadPoolExecutor | None = None
        self.num_read_ahead = 0  # host misses read by the background thread, for tests and metrics
        self.num_read_in_step = 0  # host misses read inside the step that needed them
        self.num_uploads = 0  # device LRU misses, for tests and metrics
        self.num_evictions = 0  # device LRU evictions (by count or by bytes)
        self.num_over_budget = 0  # adapters admitted into a step that already filled the reservation

    def read_ahead(self, announced: Iterable[tuple[str, str, str]]) -> None:
        """Starts reading the announced ``(content hash, name, snapshot path)``
        adapters that are in neither cache, in a background thread; a read that
        fails is read again, and fails, in the step that needs it. Called before
        every step, which first keeps the reads that finished."""
        self._keep_read_ahead()
        for content_hash, name, path in announced:
            if (content_hash in self._cpu or content_hash in self._device or content_hash in self._reading
                    or len(self._reading) >= MAX_READ_AHEAD):
                continue
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="iapt-read-ahead")
            self._reading[content_hash] = self._reader.submit(self._read, content_hash, name, path)

    def _load_cpu(self, content_hash: str, name: str, path: str) -> HostAdapter:
        adapter = self._cpu.get(content_hash)
        if adapter is not None:
            return adapter
        future = self._reading.pop(content_hash, None)
        if future is not None and future.exception() is None:  # waits if the read is still under way
            host = future.result()
            self.num_read_ahead += 1
        else:
            host = self._read(content_hash, name, path)
            self.num_read_in_step += 1
        self._keep(content_hash, host)
        return host

    def _keep_read_ahead(self) -> None:
        """Moves finished reads ahead into the CPU cache (failed ones are dropped)."""
        for content_hash, future in list(self._reading.items()):
            if future.done():
                del self._reading[content_hash]
                if future.exception() is None:
                    self._keep(content_hash, future.result())
                    self.num_read_ahead += 1

    def _keep(self, content_hash: str, host: HostAdapter) -> None:
        if self._cpu.put_if_fits(content_hash, host):  # larger than the cache: used for this step, not kept
            while self.config.max_cpu_adapters is not None and len(self._cpu) > self.config.max_cpu_adapters:
                self._cpu.remove_oldest()

    def _read(self, content_hash: str, name: str, path: str) -> HostAdapter:
        """Reads, checks and packs a snapshot (in a step, or in the read-ahead thread:
        it touches no cache)."""
        if not is_snapshot_path(path, self.snapshot_root) or os.path.basename(path) != content_hash:
            raise AdapterError(name, f"{path!r} is not a snapshot in this engine's snapshot directory "
                               f"{self.snapshot_root!r}")
        if not os.path.isdir(path):
            raise AdapterError(name, f"its snapshot {path!r} is not on {socket.gethostname()}: the front end that "
                               "accepted the request wrote it on another node or it was deleted; with engines or "
                               "workers on several nodes, --iapt-snapshot-dir must be storage every node shares")
        adapter = load_adapter(path, name=name, hidden_size=self.hidden_size,
                               num_hidden_layers=self.num_hidden_layers, root=self.snapshot_root)
        if adapter.content_hash != content_hash:
            raise AdapterError(name, f"snapshot {path!r} does not hold the content that was accepted")
        layers = {i: adapter.layer_weights(i) for i in adapter.config.generator_layers
                  if self.layers is None or i in self.layers}  # a pipeline stage keeps its own layers only
        return HostAdapter(memory.AdapterShape.of(adapter.config),
                           PackedGenerators.pack(layers, self.hidden_size, pin=self._pin))

    def configure_memory(self, limits: memory.StepLimits, budget: int) -> None:
        """Bounds the device memory of adapters to ``budget`` bytes (what the
        worker reserved from the KV cache), steps sized by ``limits``."""
        self.limits, self.budget = limits, budget

    def get(self, content_hash: str, name: str, path: str) -> DeviceAdapter:
        """The adapter's device weights, admitted into the step being planned
        (raises an :class:`AdapterError` if it cannot be loaded or does not fit)."""
        weights = self._device.get(content_hash)
        if weights is not None:
            self._device.pin(content_hash)  # before admitting: making room must not evict it
            self._admit(content_hash, self._shapes[content_hash], name)
            return weights
        host = self._load_cpu(content_hash, name, path)
        self._admit(content_hash, host.shape, name)
        weights: DeviceAdapter = [None] * self.num_hidden_layers
        # One copy per adapter, asynchronous from pinned memory; none on a CPU device. The
        # layers' weights are views laid out for vllm_iapt.generator.generate_grouped.
        for layer, w in host.packed.to(self.device).unpack().items():
            weights[layer] = w
        self._device[content_hash] = weights
        self._device.pin(content_hash)
        self._shapes[content_hash] = self._step[content_hash]
        self.failed_hashes.pop(content_hash, None)
        self.num_uploads += 1
        return weights

    def _needed(self, step: dict[str, memory.AdapterShape]) -> int:
        """Device bytes while a step of ``step`` runs, with the other resident adapters kept."""
        idle = [shape for h, shape in self._shapes.items() if h not in step]
        if self.limits is None:
            return sum(shape.device_bytes(self.hidden_size) for shape in [*step.values(), *idle])
        return memory.total_bytes(step.values(), idle, self.limits)

    def _admit(self, content_hash: str, shape: memory.AdapterShape, name: str) -> None:
        """Adds the adapter to the step being planned, evicting resident adapters the
        step does not use (least recently used first) until everything fits in
        ``budget`` (or nothing is left to evict); raises only if it cannot fit alone."""
        if self.budget is None or content_hash in self._step:
            self._step[content_hash] = shape
            return
        idle = sum(s.device_bytes(self.hidden_size) for h, s in self._shapes.items() if h != content_hash)
        alone = self._needed({content_hash: shape}) - idle
        if alone > self.budget:
            self._no_room.add(content_hash)
            weights = shape.device_bytes(self.hidden_size)
            rows = "" if self.limits is None else f" for max_num_batched_tokens={self.limits.max_tokens} rows"
            raise AdapterError(name, (
                f"needs {_mib(alone)} of device memory in a prefill step (weights {_mib(weights)}, generator "
                f"working memory{rows} {_mib(alone - weights)}), more than max_device_adapter_bytes "
                f"({_mib(self.budget)}) allows; raise {self._raise_hint()} or lower --max-num-batched-tokens"))
        step = {**self._step, content_hash: shape}
        while self._needed(step) > self.budget:
            if len(self._device.pinned_items) == len(self._device):  # every resident adapter is in the step
                self.num_over_budget += 1
                logger.warning(
                    "IAPT: adapter %r and the %d other adapter(s) of this prefill step need %s, more than the %s "
                    "reserved (max_device_adapter_bytes); the step runs over the reservation. If device memory is "
                    "tight, raise %s", name, len(self._step), _mib(self._needed(step)), _mib(self.budget),
                    self._raise_hint())
                break
            self._evict()
        self._step[content_hash] = shape

    def _raise_hint(self) -> str:
        hint = f"{_FLAG} (additional_config['iapt']['max_device_adapter_bytes'])"
        if self.config.max_device_adapter_bytes is None:
            hint += ", whose default grows with --max-iapt-adapters"
        return hint

    def _evict(self) -> None:
        """Evicts the least recently used resident adapter the step being planned does not use."""
        content_hash, _ = self._device.popitem()
        del self._shapes[content_hash]
        self.num_evictions += 1

    def trim(self) -> None:
        """Ends the step being planned: unpins its adapters and evicts device-resident
        adapters beyond ``max_adapters`` (after a step that needed more than that at once)."""
        self._device.pinned_items.clear()
        while len(self._device) > self.config.max_adapters:
            self._evict()
        self._step = {}

    def resident(self) -> list[str]:
        return list(self._device)

    def device_bytes(self) -> int:
        """Bytes of the resident adapters' device weights."""
        return sum(shape.device_bytes(self.hidden_size) for shape in self._shapes.values())

    def cpu_bytes(self) -> int:
        return int(self._cpu.currsize)

    # -- failures -----------------------------------------------------------

    def record_failures(self, failures: dict[str, str], content_hash: str | None = None) -> None:
        """``failures``: request id -> reason. With ``content_hash``, later prefills
        that reuse that adapter's cached blocks fail too until a load succeeds."""
        self._failures.update(failures)
        if content_hash in self._no_room:
            # No room in this step is not a broken adapter: its blocks cached by earlier steps are
            # valid, and the failed requests' own blocks leave the prefix cache with them.
            self._no_room.discard(content_hash)
            content_hash = None
        if content_hash is not None and failures:
            self.failed_hashes[content_hash] = next(iter(failures.values()))

    def has_failures(self) -> bool:
        return bool(self._failures)

    def take_failures(self) -> dict[str, str]:
        out, self._failures = self._failures, {}
        return out


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
