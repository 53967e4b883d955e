"""The server's catalog file, edited while it serves: whole-file atomic writes, one edit at a time.

Why this shape: ``t2l:@name`` is resolved against an in-memory mapping that requests read without a lock,
so an edit builds a new mapping, writes it to a temporary file beside the catalog, fsyncs it and
``os.replace``\\ s it over the old file, and only then publishes the new mapping in one assignment. A failed
write (full disk, read-only file system) leaves the old file and the old mapping as they were. Edits are
serialised by one lock, so concurrent edits of a name end with the last writer's entry and no edit of
another name is lost.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from vllm_t2l.names import CATALOG_NAME, AdapterNameError, CatalogEntry, NameLimits, catalog_entry, load_catalog

MAX_NAMES = 4096


class CatalogWriteError(Exception):
    """The catalog could not be changed; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _status_of(e: OSError) -> tuple[int, str]:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507, "no space left on the catalog's disk; the catalog is unchanged"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return 503, "the catalog file is read-only on this server; the catalog is unchanged"
    return 500, f"could not write the catalog ({os.strerror(e.errno or 0)}); the catalog is unchanged"


class CatalogStore:
    """Owns the catalog file and publishes each accepted edit through ``publish(new_mapping)``."""

    def __init__(self, path: Path, current: dict[str, str | CatalogEntry],
                 publish: Callable[[dict[str, str | CatalogEntry]], None], limits: NameLimits | None = None):
        self.path = Path(path)
        self.entries = dict(current)
        self.publish = publish
        self.limits = limits or NameLimits()
        self._lock = asyncio.Lock()

    @classmethod
    def open(cls, path: Path, publish: Callable[[dict[str, str | CatalogEntry]], None],
             limits: NameLimits | None = None) -> CatalogStore:
        """The store for ``path``, read from it when it exists (an absent file is an empty catalog)."""
        current = load_catalog(path) if Path(path).exists() else {}
        return cls(path, current, publish, limits)

    def get(self, name: str) -> CatalogEntry | None:
        value = self.entries.get(name)
        return None if value is None else catalog_entry(value, self.limits)

    async def put(self, name: str, value: object) -> tuple[CatalogEntry, bool]:
        """Create or replace ``name``; return the stored entry and whether it is new."""
        if not CATALOG_NAME.match(name):
            raise AdapterNameError(f"catalog name {name[:80]!r} is malformed: 1-64 of letters, digits, '_', '.', "
                                   "'-', starting with a letter or digit")
        entry = catalog_entry(value, self.limits)
        async with self._lock:
            created = name not in self.entries
            if created and len(self.entries) >= MAX_NAMES:
                raise CatalogWriteError(409, f"the catalog already holds {MAX_NAMES} names; delete some first")
            new = dict(self.entries)
            new[name] = entry.terms[0][0] if entry.plain else entry
            await self._commit(new)
        return entry, created

    async def delete(self, name: str) -> bool:
        async with self._lock:
            if name not in self.entries:
                return False
            new = dict(self.entries)
            del new[name]
            await self._commit(new)
        return True

    async def _commit(self, new: dict[str, str | CatalogEntry]) -> None:
        await asyncio.to_thread(self._write, new)
        self.entries = new
        self.publish(new)

    def _write(self, entries: dict[str, str | CatalogEntry]) -> None:
        data = {k: (v if isinstance(v, str) else v.to_json()) for k, v in entries.items()}
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise CatalogWriteError(*_status_of(e)) from None
        try:  # make the rename itself durable; not every file system lets a directory be fsynced
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
