"""CatalogStore: atomic whole-file writes, last writer wins, failed writes change nothing."""

from __future__ import annotations

import asyncio
import errno
import json
import os

import pytest

from vllm_t2l.names import AdapterNameError, CatalogEntry
from vllm_t2l.serving.catalog import CatalogStore, CatalogWriteError


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"pirate": "Talk like a pirate."}))
    published = []
    s = CatalogStore.open(path, published.append)
    s.published = published
    return s


def test_put_writes_plain_and_mixed_entries(store):
    entry, created = asyncio.run(store.put("brief", "Be brief."))
    assert created and entry.plain
    mix = {"descriptions": ["a", "b"], "weights": [0.5, 0.5], "mode": "weight", "strength": 2.0}
    asyncio.run(store.put("ab", mix))
    on_disk = json.loads(store.path.read_text())
    assert on_disk == {"pirate": "Talk like a pirate.", "brief": "Be brief.", "ab": mix}
    assert store.published[-1]["ab"] == CatalogEntry((("a", 0.5), ("b", 0.5)), "weight", 2.0)
    assert store.published[-1] is store.entries  # what the resolver reads is what is on disk


def test_missing_file_is_an_empty_catalog_created_on_first_put(tmp_path):
    s = CatalogStore.open(tmp_path / "sub" / "c.json", lambda _: None)
    assert s.entries == {}
    asyncio.run(s.put("x", "y"))
    assert json.loads((tmp_path / "sub" / "c.json").read_text()) == {"x": "y"}


def test_bad_names_and_entries(store):
    with pytest.raises(AdapterNameError, match="malformed"):
        asyncio.run(store.put("../x", "y"))
    with pytest.raises(AdapterNameError, match="unknown fields"):
        asyncio.run(store.put("x", {"descriptions": ["y"], "colour": "red"}))
    assert json.loads(store.path.read_text()) == {"pirate": "Talk like a pirate."}


def test_concurrent_puts_keep_every_name(store):
    async def many():
        await asyncio.gather(*[store.put(f"n{i}", f"text {i}") for i in range(20)],
                             *[store.put("same", f"variant {i}") for i in range(20)])
    asyncio.run(many())
    on_disk = json.loads(store.path.read_text())
    assert all(on_disk[f"n{i}"] == f"text {i}" for i in range(20))
    assert on_disk["same"] == "variant 19"  # edits land in arrival order: the last writer wins


@pytest.mark.parametrize("code, status", [(errno.ENOSPC, 507), (errno.EROFS, 503), (errno.EIO, 500)])
def test_failed_write_changes_nothing(store, monkeypatch, code, status):
    # A full or read-only disk cannot be made here without root mounts, so the failing call is injected.
    def fail(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", fail)
    before = store.path.read_text()
    with pytest.raises(CatalogWriteError) as e:
        asyncio.run(store.put("new", "text"))
    assert e.value.status == status
    assert store.path.read_text() == before and "new" not in store.entries and not store.published
    assert [p.name for p in store.path.parent.iterdir()] == ["catalog.json"]
