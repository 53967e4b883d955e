"""Content-addressed adapter folders on disk: single-flight creation, bounded LRU, safe eviction,
shared by any number of servers (replicas) that point at the same folder.

Folders are named by content id only (hex), never by anything a client typed, so no name can
reach a path outside the cache root. Content ids are deterministic, so two replicas that create the
same id create the same adapter: whichever publishes second keeps the first's folder.

- Publishing: a folder is written under ``.tmp-*``, sealed with a manifest (size and SHA-256 of every
  file) and renamed into place, so it appears complete or not at all. A folder is handed out only
  after its manifest checks out (except right after this process wrote it); one that does not (a
  truncated or corrupted file, a folder of an older version) is moved aside and regenerated.
- Leases: every replica touches (``utime``) the folders in its index every ``grace_s / 4`` seconds.
  vLLM's workers read an adapter's folder whenever they (re)load it, so eviction first tells the
  owner to unregister the adapter's names and keeps the files for ``grace_s``; after that the folder
  is deleted only if no replica has touched it for ``grace_s`` (another replica still serving it keeps
  it alive; the last one to let go deletes it). A request for the same content in between revives it.
All methods run on the event loop; the creation coroutine decides where the heavy work runs.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
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
MANIFEST = "t2l_manifest.json"
STALE_TMP_S = 600.0  # a .tmp-* folder untouched this long was left by a killed process
MAX_NAMES = 8  # names registered with vLLM per adapter; older spellings are unregistered first


@dataclass(frozen=True)
class CacheLimits:
    max_adapters: int = 256
    max_bytes: int = 2 << 30
    grace_s: float = 60.0  # how long an evicted folder stays readable for in-flight loads


@dataclass
class Entry:
    path: Path
    nbytes: int
    names: dict[str, None] = field(default_factory=dict)  # insertion-ordered set


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def seal(folder: Path) -> None:
    """Record every file's size and SHA-256 in the folder's manifest (written last, before publishing)."""
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    part = folder / f"{MANIFEST}.part"
    part.write_text(json.dumps({"files": files}))
    os.replace(part, folder / MANIFEST)


def verify(folder: Path) -> bool:
    """Whether the folder is complete and every file matches the manifest written with it."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        if READY not in files:
            return False
        for name, want in files.items():
            f = folder / name
            if f.stat().st_size != want["size"] or _sha256(f) != want["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove(path: Path, root: Path, why: str) -> None:
    """Move a folder out of the way in one rename (readers never see it half-deleted), then delete it."""
    aside = root / f".{why}-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


class AdapterCache:
    def __init__(self, root: Path, limits: CacheLimits = CacheLimits(),
                 on_evict: Callable[[str, set[str]], None] | None = None):
        self.root = Path(root)
        self.limits = limits
        self.on_evict = on_evict
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.retired: dict[str, tuple[Entry, float]] = {}
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._refresh_loop: asyncio.AbstractEventLoop | None = None
        self.nbytes = 0  # bytes of the entries (retired ones not counted)
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        """Adopt published folders (oldest first); drop what killed processes left behind."""
        found = []
        now = time.time()
        for p in self.root.iterdir():
            if p.name.startswith((".bad-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".tmp-"):  # maybe another live replica's folder being written
                try:
                    if now - p.stat().st_mtime >= STALE_TMP_S:
                        shutil.rmtree(p, ignore_errors=True)
                except FileNotFoundError:
                    pass
            elif p.is_dir() and KEY.fullmatch(p.name) and (p / READY).exists() and (p / MANIFEST).exists():
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
        callers ask for the same key at the same time; the folder appears complete or not at all.
        A folder this process did not just write is checked against its manifest first."""
        path = self.path(key)
        self._schedule_refresh()
        if key in self.retired:
            self._add(key, self.retired.pop(key)[0])
        if key in self.entries and key not in self._inflight:
            if await asyncio.to_thread(verify, path):
                self.entries.move_to_end(key)
                self._touch(path)
                return path, True
            log.warning("vllm-t2l: adapter %s failed its checksum; regenerating it", key)
            self._drop(key)
        first = key not in self._inflight
        if first:  # its own task: a caller that disconnects cancels its wait, not the creation
            task = asyncio.ensure_future(self._fill(key, path, create))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved" noise
            self._inflight[key] = task
        created = await asyncio.shield(self._inflight[key])
        return path, not (first and created)

    def _drop(self, key: str) -> None:
        """Forget a folder that does not check out: unregister its names and move it aside."""
        entry = self._pop(key)
        if self.on_evict and entry.names:
            self.on_evict(key, set(entry.names))
        _remove(entry.path, self.root, "bad")

    def forget(self, key: str) -> None:
        """vLLM could not load this folder: never hand it out again (the next request regenerates it)."""
        if key in self.entries:
            self._drop(key)

    async def _fill(self, key: str, path: Path, create: Callable[[Path], Awaitable[None]]) -> bool:
        """Adopt another replica's folder if it checks out, else create one; True if this call created it."""
        try:
            created = False
            if not await asyncio.to_thread(verify, path):
                await self._create(path, create)
                created = True
            self._add(key, Entry(path, _size(path)))
            self._touch(path)
        finally:
            del self._inflight[key]
        self._evict(keep=key)
        return created

    async def _create(self, path: Path, create: Callable[[Path], Awaitable[None]]) -> None:
        tmp = self.root / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            await create(tmp)
            await asyncio.to_thread(seal, tmp)
            self._publish(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path, path: Path) -> None:
        """Rename ``tmp`` to ``path``. A folder already there is another replica's copy of the same
        content: kept if it checks out, else moved aside and replaced."""
        for _ in range(3):
            try:
                os.rename(tmp, path)
                return
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if verify(path):
                return  # the finally of _create deletes our copy
            _remove(path, self.root, "bad")
        raise OSError(errno.EEXIST, f"could not publish adapter {path.name}: the folder keeps changing")

    def register(self, key: str, name: str) -> bool:
        """Record that vLLM now knows ``name`` for this folder (so it must be unregistered first).

        At most ``MAX_NAMES`` names per adapter: the oldest spelling beyond that is unregistered.
        False if the folder is no longer in the index (the caller must not register the name)."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        entry.names.pop(name, None)
        entry.names[name] = None  # most recent last
        while len(entry.names) > MAX_NAMES:
            old = next(iter(entry.names))
            del entry.names[old]
            if self.on_evict:
                self.on_evict(key, {old})
        return True

    # ---- leases and eviction -----------------------------------------------------------------

    def _touch(self, path: Path) -> None:
        try:
            os.utime(path)
        except OSError:
            pass

    def _schedule_refresh(self) -> None:
        loop = asyncio.get_running_loop()
        if self._refresh_loop is not loop:
            self._refresh_loop = loop
            loop.call_later(self._refresh_every(), self._refresh)

    def _refresh_every(self) -> float:
        return max(self.limits.grace_s / 4, 0.05)

    def _refresh(self) -> None:
        """Renew this replica's lease on every folder it serves, and delete expired retirees."""
        for entry in list(self.entries.values()):
            self._touch(entry.path)
        self._sweep()
        if self._refresh_loop is not None and not self._refresh_loop.is_closed():
            self._refresh_loop.call_later(self._refresh_every(), self._refresh)

    def _evict(self, keep: str | None) -> None:
        while self.entries and (len(self.entries) > self.limits.max_adapters
                                or self.nbytes > self.limits.max_bytes):
            key = next(iter(self.entries))
            if key == keep:
                break
            entry = self._pop(key)
            if self.on_evict and entry.names:
                self.on_evict(key, set(entry.names))
            entry.names = {}
            self.retired[key] = (entry, time.monotonic())
        self._sweep()
        log.debug("adapter cache: %d entries, %d bytes, %d retired",
                  len(self.entries), self.nbytes, len(self.retired))

    def _sweep(self) -> None:
        now, wall = time.monotonic(), time.time()
        grace = self.limits.grace_s
        for key, (entry, since) in list(self.retired.items()):
            if now - since < grace:
                continue
            del self.retired[key]
            try:
                leased = wall - entry.path.stat().st_mtime < grace  # another replica touched it
            except FileNotFoundError:
                continue
            if not leased:
                _remove(entry.path, self.root, "trash")
