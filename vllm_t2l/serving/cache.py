"""Content-addressed adapter folders on disk: single-flight creation, bounded LRU, safe eviction.

Folders are named by content id only (hex), never by anything a client typed, so no name can
reach a path outside the cache root. vLLM's workers read an adapter's folder whenever they (re)load
it, so eviction first tells the owner to unregister the adapter's names, and deletes the files only
after a grace period; a request for the same content in between revives the entry.
All methods run on the event loop; the creation coroutine decides where the heavy work runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("vllm.t2l")
KEY = re.compile(r"[0-9a-f]{8,64}")
READY = "adapter_config.json"


@dataclass(frozen=True)
class CacheLimits:
    max_adapters: int = 256
    max_bytes: int = 2 << 30
    grace_s: float = 60.0  # how long an evicted folder stays readable for in-flight loads


@dataclass
class Entry:
    path: Path
    nbytes: int
    names: set[str] = field(default_factory=set)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class AdapterCache:
    def __init__(self, root: Path, limits: CacheLimits = CacheLimits(),
                 on_evict: Callable[[str, set[str]], None] | None = None):
        self.root = Path(root)
        self.limits = limits
        self.on_evict = on_evict
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.retired: dict[str, tuple[Entry, float]] = {}
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self.nbytes = 0  # bytes of the entries (retired ones not counted)
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        """Adopt complete folders from an earlier run (oldest first); drop half-written ones."""
        found = []
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and KEY.fullmatch(p.name) and (p / READY).exists():
                found.append((p.stat().st_mtime, p))
        for _, p in sorted(found):
            self._add(p.name, Entry(p, _size(p)))
        self._evict(keep=None)

    def _add(self, key: str, entry: Entry) -> None:
        self.entries[key] = entry
        self.nbytes += entry.nbytes

    def _pop(self, key: str) -> Entry:
        entry = self.entries.pop(key)
        self.nbytes -= entry.nbytes
        return entry

    def path(self, key: str) -> Path:
        if not KEY.fullmatch(key):
            raise ValueError(f"cache keys are hex content ids, got {key!r}")
        return self.root / key

    async def get(self, key: str, create: Callable[[Path], Awaitable[None]]) -> tuple[Path, bool]:
        """Return (folder, hit). On a miss, ``await create(tmp_folder)`` runs once, however many
        callers ask for the same key at the same time; the folder appears complete or not at all."""
        path = self.path(key)
        if key in self.entries:
            self.entries.move_to_end(key)
            return path, True
        if key in self.retired:
            self._add(key, self.retired.pop(key)[0])
            return path, True
        first = key not in self._inflight
        if first:  # its own task: a caller that disconnects cancels its wait, not the creation
            task = asyncio.ensure_future(self._fill(key, path, create))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved" noise
            self._inflight[key] = task
        await asyncio.shield(self._inflight[key])
        return path, not first

    async def _fill(self, key: str, path: Path, create: Callable[[Path], Awaitable[None]]) -> None:
        try:
            await self._create(path, create)
            self._add(key, Entry(path, _size(path)))
        finally:
            del self._inflight[key]
        self._evict(keep=key)

    async def _create(self, path: Path, create: Callable[[Path], Awaitable[None]]) -> None:
        tmp = self.root / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            await create(tmp)
            if path.exists():  # a retired copy of the same content, already deleted from the index
                shutil.rmtree(path)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def register(self, key: str, name: str) -> None:
        """Record that vLLM now knows ``name`` for this folder (so it must be unregistered first)."""
        if key in self.entries:
            self.entries[key].names.add(name)

    def _evict(self, keep: str | None) -> None:
        while self.entries and (len(self.entries) > self.limits.max_adapters
                                or self.nbytes > self.limits.max_bytes):
            key = next(iter(self.entries))
            if key == keep:
                break
            entry = self._pop(key)
            if self.on_evict and entry.names:
                self.on_evict(key, entry.names)
            entry.names = set()
            self.retired[key] = (entry, time.monotonic())
        now = time.monotonic()
        for key, (entry, since) in list(self.retired.items()):
            if now - since >= self.limits.grace_s:
                del self.retired[key]
                shutil.rmtree(entry.path, ignore_errors=True)
        log.debug("adapter cache: %d entries, %d bytes, %d retired",
                  len(self.entries), self.nbytes, len(self.retired))
