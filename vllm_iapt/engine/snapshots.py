"""Content-addressed adapter snapshots: the bytes the front end validated, for the worker.

When the front end validates an adapter it writes exactly the validated bytes
(the canonical ``adapter_config.json`` and the weights file as read) into
``<snapshot_dir>/<content hash>/``, atomically (a temporary directory renamed into
place), or reuses the snapshot if it is already there. A request carries the
snapshot's path to the worker (``extra_args["iapt"]["path"]``, with the user's path
as ``source`` for messages), and the worker loads only from snapshots, confined to
the snapshot directory, and checks the content hash. Replacing, deleting or
re-linking the user's files after a request was accepted therefore never changes
what the worker computes with, and never reaches it.

The directory is bounded in bytes (``max_snapshot_bytes``): to make room, the least
recently used snapshots are deleted, except those still needed. A snapshot is needed
until the last request accepted with it finishes (a worker keeps an adapter in its CPU
cache once loaded, but a preempted request may need it again after the cache let it
go). This process knows its own requests (:attr:`SnapshotStore.in_use`). For other
servers sharing the directory, a snapshot's mtime is its last use: every accepted
request sets it, and every front end sets it again on its in-flight snapshots every
:data:`TOUCH_INTERVAL_SECONDS` (``IAPTFrontend.before_outputs``). So a snapshot whose
mtime is still the one this process set was used by nobody else since, and goes as
soon as none of this process's requests needs it; one another server used is kept
until it has been idle for :data:`MIN_IDLE_SECONDS`. A burst of any number of
distinct adapters therefore fits as long as the adapters of the requests in flight
do. An adapter that still does not fit is refused. Snapshots are immutable and named
by content.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable

from vllm_iapt.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, IAPTAdapter, config_bytes

#: A front end sets the mtime of its in-flight snapshots this often (their last use).
TOUCH_INTERVAL_SECONDS = 30.0
#: A snapshot another server used this recently is never deleted to make room.
MIN_IDLE_SECONDS = 4 * TOUCH_INTERVAL_SECONDS
_MAX_TOUCHED = 1 << 16
_TMP_PREFIX = ".tmp-"


def default_snapshot_dir() -> str:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"vllm-iapt-snapshots-{uid}")


def snapshot_root(snapshot_dir: str | None, create: bool = False) -> str:
    """The real path of the snapshot directory. With ``create``, makes it (mode
    0700) and checks that it is a directory owned by this user that nobody else
    can write to; a directory another local user prepared is refused."""
    path = snapshot_dir or default_snapshot_dir()
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    real = os.path.realpath(path)
    if create:
        st = os.stat(real)
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"IAPT snapshot directory {path!r} is not a directory")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise ValueError(f"IAPT snapshot directory {path!r} is owned by another user; set "
                             "snapshot_dir (--iapt-snapshot-dir) to a private directory")
        if st.st_mode & 0o022:
            raise ValueError(f"IAPT snapshot directory {path!r} is writable by other users; set "
                             "snapshot_dir (--iapt-snapshot-dir) to a private directory or chmod 700 it")
    return real


def is_snapshot_path(path: str, root: str) -> bool:
    """Whether ``path`` names a snapshot directly under ``root``."""
    parent, name = os.path.split(os.path.normpath(path))
    return parent == root and len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class SnapshotStore:
    def __init__(self, snapshot_dir: str | None, max_bytes: int) -> None:
        self.root = snapshot_root(snapshot_dir, create=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        #: snapshot -> the mtime_ns this process last set on it, oldest first
        self._touched: dict[str, int] = {}
        #: The snapshots of this process's requests in flight (set by the front end).
        self.in_use: Callable[[], set[str]] = set
        #: snapshot -> requests being accepted with it (see :meth:`hold`)
        self._held: dict[str, int] = {}

    def path_of(self, content_hash: str) -> str:
        return os.path.join(self.root, content_hash)

    def exists(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, WEIGHTS_NAME)) and os.path.isfile(os.path.join(path, CONFIG_NAME))

    @staticmethod
    def stamp(path: str) -> tuple | None:
        """Identity of a snapshot's files as written (None if one is missing): a
        snapshot changed behind the store's back no longer matches."""
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (
                os.stat(os.path.join(path, CONFIG_NAME), follow_symlinks=False),
                os.stat(os.path.join(path, WEIGHTS_NAME), follow_symlinks=False)))
        except OSError:
            return None

    def touch(self, path: str) -> None:
        """Marks a snapshot as used now: sets its mtime, the last use other servers see."""
        ns = time.time_ns()
        try:
            os.utime(path, ns=(ns, ns))
        except OSError:
            return
        self._touched.pop(path, None)
        self._touched[path] = ns
        if len(self._touched) > _MAX_TOUCHED:
            del self._touched[next(iter(self._touched))]

    def use_if_intact(self, path: str, stamp: tuple, hold: bool = False) -> bool:
        """Marks the snapshot used now if its files still have ``stamp``; with ``hold``
        also holds it for a request being accepted (atomically with making room: a
        snapshot found intact here is not deleted before :meth:`release`)."""
        with self._lock:
            if self.stamp(path) != stamp:
                return False
            self.touch(path)
            if hold:
                self._hold(path)
            return True

    def _hold(self, path: str) -> None:
        self._held[path] = self._held.get(path, 0) + 1

    def release(self, path: str) -> None:
        """Ends a hold (``use_if_intact`` or ``put`` with ``hold``): the request is now
        in flight (:attr:`in_use` covers it) or was not accepted."""
        with self._lock:
            n = self._held.pop(path, 0) - 1
            if n > 0:
                self._held[path] = n

    def put(self, adapter: IAPTAdapter, weights: bytes, hold: bool = False) -> str:
        """Writes (or reuses) the snapshot of a validated adapter; returns its path,
        held for a request being accepted with ``hold`` (see :meth:`release`).
        Raises :class:`AdapterError` if it cannot fit in ``max_snapshot_bytes``."""
        final = self.path_of(adapter.content_hash)
        config = config_bytes(adapter.config)
        with self._lock:
            if self._holds(final, config, weights):
                self.touch(final)
                if hold:
                    self._hold(final)
                return final
            self._make_room(len(config) + len(weights), adapter.name)
            tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root)
            try:
                for name, data in ((CONFIG_NAME, config), (WEIGHTS_NAME, weights)):
                    # No fsync: a snapshot damaged by a crash is found and written again
                    # (_holds compares the bytes) and the worker checks the content hash.
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
                if os.path.lexists(final):  # an incomplete or damaged snapshot
                    shutil.rmtree(final, ignore_errors=True)
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not self._holds(final, config, weights):
                        raise
                    # Another process wrote the same content first.
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.touch(final)
            if hold:
                self._hold(final)
            return final

    @staticmethod
    def _holds(path: str, config: bytes, weights: bytes) -> bool:
        """Whether the snapshot at ``path`` holds exactly these bytes (a damaged one
        is written again)."""
        if not SnapshotStore._complete(path, len(config), len(weights)):
            return False
        try:
            for name, data in ((CONFIG_NAME, config), (WEIGHTS_NAME, weights)):
                with open(os.path.join(path, name), "rb") as f:
                    if f.read(len(data) + 1) != data:
                        return False
        except OSError:
            return False
        return True

    @staticmethod
    def _complete(path: str, config_size: int, weights_size: int) -> bool:
        try:
            return (os.path.getsize(os.path.join(path, CONFIG_NAME)) == config_size
                    and os.path.getsize(os.path.join(path, WEIGHTS_NAME)) == weights_size
                    and not os.path.islink(path))
        except OSError:
            return False

    def entries(self) -> list[tuple[int, int, str]]:
        """(last use as mtime_ns, bytes, path) of every snapshot, oldest first."""
        out = []
        for entry in os.scandir(self.root):
            try:
                if entry.name.startswith(_TMP_PREFIX):
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime > 3600:
                        shutil.rmtree(entry.path, ignore_errors=True)  # left by a crashed writer
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
                size = sum(f.stat(follow_symlinks=False).st_size for f in os.scandir(entry.path))
                out.append((entry.stat(follow_symlinks=False).st_mtime_ns, size, entry.path))
            except OSError:
                continue
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _make_room(self, size: int, name: str) -> None:
        entries = self.entries()
        total = sum(s for _, s, _ in entries)
        if total + size <= self.max_bytes:
            return
        now_ns, busy = time.time_ns(), self.in_use()
        for mtime_ns, s, path in entries:
            if total + size <= self.max_bytes:
                break
            if path in busy or path in self._held:
                continue
            mine = self._touched.get(path)
            # Last used by this process (nobody else set its mtime since): not needed any more.
            # Else another server used it: only time tells that it is done with it.
            if mine != mtime_ns and now_ns - mtime_ns < MIN_IDLE_SECONDS * 1e9:
                continue
            shutil.rmtree(path, ignore_errors=True)
            self._touched.pop(path, None)
            total -= s
        if total + size > self.max_bytes:
            raise AdapterError(
                name, f"the adapter snapshot directory is full ({total} of max_snapshot_bytes={self.max_bytes} "
                f"bytes in snapshots of requests in flight, just accepted, or used by another server sharing the "
                f"directory in the last {int(MIN_IDLE_SECONDS)} s; this adapter needs {size}); retry later or "
                "raise --iapt-max-snapshot-bytes")
