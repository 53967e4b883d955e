"""Tests for vllm_t2l.serving.cache: single-flight creation, LRU by count and bytes, safe eviction.

Each test runs its coroutines with asyncio.run (pytest-asyncio is not installed).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_t2l.serving.cache import MANIFEST, READY, STALE_TMP_S, AdapterCache, CacheLimits, verify

K1, K2, K3, K4 = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)


class Maker:
    """A creation coroutine that writes a small adapter folder and counts its calls."""

    def __init__(self, size: int = 100, delay: float = 0.0, fail: BaseException | None = None):
        self.size, self.delay, self.fail = size, delay, fail
        self.calls: list[Path] = []

    async def __call__(self, tmp: Path) -> None:
        self.calls.append(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "adapter_model.safetensors").write_bytes(b"\0" * self.size)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        (tmp / READY).write_text(json.dumps({"r": 8}))


def entry_bytes(size: int) -> int:
    """Bytes one Maker(size) folder takes in the cache: its files and the manifest sealed with them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cache = AdapterCache(Path(tmp))
        asyncio.run(cache.get(K4, Maker(size=size)))
        return cache.nbytes


def _tmp_dirs(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_miss_then_hit(tmp_path):
    cache = AdapterCache(tmp_path / "c")
    make = Maker()

    async def main():
        p1, hit1 = await cache.get(K1, make)
        p2, hit2 = await cache.get(K1, make)
        return p1, hit1, p2, hit2

    p1, hit1, p2, hit2 = asyncio.run(main())
    assert (hit1, hit2) == (False, True)
    assert p1 == p2 == tmp_path / "c" / K1
    assert (p1 / READY).is_file()
    assert len(make.calls) == 1
    assert make.calls[0].parent == tmp_path / "c" and make.calls[0].name.startswith(".tmp-")
    assert not make.calls[0].exists()
    assert cache.nbytes == entry_bytes(100) > 100 + len(json.dumps({"r": 8}))
    assert _tmp_dirs(tmp_path / "c") == []


def test_concurrent_gets_create_once(tmp_path):
    cache = AdapterCache(tmp_path)
    make = Maker(delay=0.05)

    async def main():
        return await asyncio.gather(*(cache.get(K1, make) for _ in range(16)))

    results = asyncio.run(main())
    assert len(make.calls) == 1
    assert {p for p, _ in results} == {tmp_path / K1}
    assert sum(not hit for _, hit in results) == 1
    assert list(cache.entries) == [K1]
    assert cache._inflight == {}


def test_concurrent_gets_different_keys(tmp_path):
    cache = AdapterCache(tmp_path)
    make = Maker(delay=0.02)

    async def main():
        return await asyncio.gather(*(cache.get(k, make) for k in (K1, K2, K1, K3, K2)))

    results = asyncio.run(main())
    assert len(make.calls) == 3
    assert [p.name for p, _ in results] == [K1, K2, K1, K3, K2]


def test_failing_create(tmp_path):
    cache = AdapterCache(tmp_path)
    bad = Maker(delay=0.05, fail=RuntimeError("hypernet exploded"))

    async def main():
        return await asyncio.gather(*(cache.get(K1, bad) for _ in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert len(bad.calls) == 1
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
    assert not (tmp_path / K1).exists()
    assert _tmp_dirs(tmp_path) == []
    assert K1 not in cache.entries and cache._inflight == {}

    good = Maker()
    path, hit = asyncio.run(cache.get(K1, good))
    assert not hit and len(good.calls) == 1 and (path / READY).exists()


def recording_cache(root, **limits) -> tuple[AdapterCache, list[tuple[str, set[str]]]]:
    """A cache whose evictions are recorded as (key, registered names)."""
    evicted: list[tuple[str, set[str]]] = []
    cache = AdapterCache(root, CacheLimits(**limits), on_evict=lambda k, names: evicted.append((k, set(names))))
    return cache, evicted


def test_lru_eviction_by_count(tmp_path):
    cache, evicted = recording_cache(tmp_path, max_adapters=2, grace_s=0)
    make = Maker()

    async def main():
        await cache.get(K1, make)
        cache.register(K1, "t2l:one")
        cache.register(K1, "t2l-mix:1*one")
        await cache.get(K2, make)
        cache.register(K2, "t2l:two")
        await cache.get(K1, make)  # a hit: K1 is now the most recently used
        await cache.get(K3, make)  # evicts K2, the least recently used

    asyncio.run(main())
    assert evicted == [(K2, {"t2l:two"})]
    assert list(cache.entries) == [K1, K3]
    assert not (tmp_path / K2).exists()  # grace 0: deleted at once
    assert (tmp_path / K1).exists() and (tmp_path / K3).exists()
    assert cache.retired == {}


def test_eviction_without_names_does_not_call_back(tmp_path):
    evicted = []
    cache = AdapterCache(tmp_path, CacheLimits(max_adapters=1, grace_s=0),
                         on_evict=lambda k, names: evicted.append(k))

    async def main():
        await cache.get(K1, Maker())
        await cache.get(K2, Maker())

    asyncio.run(main())
    assert evicted == [] and list(cache.entries) == [K2] and not (tmp_path / K1).exists()


def test_lru_eviction_by_bytes(tmp_path):
    size = entry_bytes(1000)
    cache, evicted = recording_cache(tmp_path, max_adapters=100, max_bytes=2 * size + 10, grace_s=0)

    async def main():
        for k in (K1, K2, K3):
            await cache.get(k, Maker(size=1000))
            cache.register(k, f"name-{k[0]}")

    asyncio.run(main())
    assert evicted == [(K1, {"name-a"})]
    assert list(cache.entries) == [K2, K3]
    assert cache.nbytes == 2 * size
    assert not (tmp_path / K1).exists()


def test_entry_bigger_than_budget_is_kept(tmp_path):
    cache = AdapterCache(tmp_path, CacheLimits(max_bytes=10, grace_s=0))

    async def main():
        await cache.get(K1, Maker(size=50))
        return await cache.get(K2, Maker(size=50))

    path, hit = asyncio.run(main())
    assert list(cache.entries) == [K2] and path.exists() and not (tmp_path / K1).exists()


def test_grace_period_keeps_files_and_revives(tmp_path):
    cache, evicted = recording_cache(tmp_path, max_adapters=1, grace_s=3600)
    make = Maker()

    async def main():
        await cache.get(K1, make)
        cache.register(K1, "t2l:one")
        await cache.get(K2, make)
        assert evicted == [(K1, {"t2l:one"})]
        assert K1 in cache.retired and K1 not in cache.entries
        assert (tmp_path / K1 / READY).exists()  # still readable by in-flight loads
        return await cache.get(K1, make)  # revived from retirement, no new creation

    path, hit = asyncio.run(main())
    assert hit and path == tmp_path / K1
    assert len(make.calls) == 2
    assert K1 in cache.entries and K1 not in cache.retired
    assert (path / READY).exists()
    # names were unregistered on eviction: a revived entry starts with none
    assert not cache.entries[K1].names


def test_retired_files_deleted_after_grace(tmp_path, monkeypatch):
    """On a clock the test moves (a real sleep is too short to trust on a loaded machine): a retiree older than
    the grace period is deleted at the next eviction pass, one retired in that pass is kept."""
    from vllm_t2l.serving import cache as cache_module

    skew = [0.0]
    clock = SimpleNamespace(monotonic=lambda: time.monotonic() + skew[0], time=lambda: time.time() + skew[0])
    monkeypatch.setattr(cache_module, "time", clock)
    cache = AdapterCache(tmp_path, CacheLimits(max_adapters=1, grace_s=10))

    async def main():
        await cache.get(K1, Maker())
        await cache.get(K2, Maker())
        assert (tmp_path / K1).exists() and K1 in cache.retired
        skew[0] = 20.0
        await cache.get(K3, Maker())  # any later eviction pass sweeps expired retirees

    asyncio.run(main())
    assert not (tmp_path / K1).exists() and K1 not in cache.retired
    assert K2 in cache.retired and (tmp_path / K2).exists()


def test_restart_adopts_complete_folders(tmp_path):
    make = Maker()

    async def fill(cache):
        for k in (K1, K2):
            await cache.get(k, make)

    asyncio.run(fill(AdapterCache(tmp_path)))
    os.utime(tmp_path / K1, (time.time() - 100, time.time() - 100))  # K1 is the older one
    (tmp_path / ".tmp-deadbeef-1234").mkdir()
    (tmp_path / ".tmp-deadbeef-1234" / "junk").write_text("half")
    stale = time.time() - STALE_TMP_S - 1  # left by a killed process, not being written by a live replica
    os.utime(tmp_path / ".tmp-deadbeef-1234", (stale, stale))
    (tmp_path / ".tmp-cafebabe-5678").mkdir()  # fresh: maybe another replica's, kept
    (tmp_path / K3).mkdir()  # no adapter_config.json: never adopted
    (tmp_path / "not-a-key").mkdir()
    (tmp_path / "not-a-key" / READY).write_text("{}")

    cache = AdapterCache(tmp_path)
    assert list(cache.entries) == [K1, K2]
    assert _tmp_dirs(tmp_path) == [".tmp-cafebabe-5678"]
    assert cache.nbytes == 2 * entry_bytes(100)

    async def again():
        return await cache.get(K1, make), await cache.get(K3, make)

    (p1, hit1), (p3, hit3) = asyncio.run(again())
    assert hit1 and not hit3
    assert len(make.calls) == 3
    assert (p3 / READY).exists()


def test_restart_applies_limits(tmp_path):
    async def fill(cache):
        for k in (K1, K2, K3):
            await cache.get(k, Maker())

    asyncio.run(fill(AdapterCache(tmp_path)))
    for age, k in ((300, K1), (200, K2), (100, K3)):
        os.utime(tmp_path / k, (time.time() - age, time.time() - age))
    cache = AdapterCache(tmp_path, CacheLimits(max_adapters=2, grace_s=0))
    assert list(cache.entries) == [K2, K3]
    assert not (tmp_path / K1).exists()


@pytest.mark.parametrize("key", ["../x", "../" + "a" * 32, "A" * 32, "abc", "a" * 65, "g" * 32,
                                 "a" * 31 + "/", "", "/etc/passwd", "a" * 8 + "/../" + "b" * 8])
def test_bad_keys_refused(tmp_path, key):
    cache = AdapterCache(tmp_path / "c")
    make = Maker()
    with pytest.raises(ValueError, match="hex content ids"):
        cache.path(key)
    with pytest.raises(ValueError, match="hex content ids"):
        asyncio.run(cache.get(key, make))
    assert make.calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_key_with_trailing_newline_refused(tmp_path):
    with pytest.raises(ValueError, match="hex content ids"):
        AdapterCache(tmp_path).path("a" * 16 + "\n")


def test_good_keys(tmp_path):
    cache = AdapterCache(tmp_path)
    assert cache.path("0123abcd") == tmp_path / "0123abcd"
    assert cache.path("f" * 64) == tmp_path / ("f" * 64)


def test_register_unknown_key_is_ignored(tmp_path):
    cache = AdapterCache(tmp_path)
    cache.register(K1, "t2l:x")
    assert cache.entries == {}


def test_cancelled_first_caller_does_not_cancel_waiters(tmp_path):
    cache = AdapterCache(tmp_path)
    make = Maker(delay=0.2)

    async def main():
        first = asyncio.create_task(cache.get(K1, make))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(cache.get(K1, make))
        await asyncio.sleep(0.05)
        first.cancel()
        results = await asyncio.gather(second, return_exceptions=True)
        return results[0]

    result = asyncio.run(main())
    assert not isinstance(result, BaseException), f"the second caller failed with {result!r}"
    assert (result[0] / READY).exists()


# ---- replicas sharing one folder, checksums, leases -------------------------------------------

def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_two_replicas_publish_the_same_content_id_at_once(tmp_path):
    """Both generate (neither finds the other's folder yet); the second to publish keeps the first's."""
    a, b = AdapterCache(tmp_path), AdapterCache(tmp_path)
    make_a, make_b = Maker(delay=0.05), Maker(delay=0.05)

    async def main():
        return await asyncio.gather(a.get(K1, make_a), b.get(K1, make_b))

    (pa, _), (pb, _) = asyncio.run(main())
    assert len(make_a.calls) == len(make_b.calls) == 1
    assert pa == pb == tmp_path / K1 and verify(pa)
    assert sorted(p.name for p in tmp_path.iterdir()) == [K1]  # no temporary or moved-aside folder left
    assert K1 in a.entries and K1 in b.entries


def test_replica_adopts_a_folder_another_published(tmp_path):
    a, b = AdapterCache(tmp_path), AdapterCache(tmp_path)
    asyncio.run(a.get(K1, Maker()))
    make = Maker()
    path, hit = asyncio.run(b.get(K1, make))
    assert hit and make.calls == [] and K1 in b.entries


def test_corrupted_file_is_detected_and_regenerated(tmp_path):
    cache, evicted = recording_cache(tmp_path)
    make = Maker()

    async def main():
        await cache.get(K1, make)
        cache.register(K1, "t2l:one")
        weights = tmp_path / K1 / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[10] ^= 0xFF  # same size, one byte flipped
        weights.write_bytes(bytes(data))
        return await cache.get(K1, make)

    path, hit = asyncio.run(main())
    assert not hit and len(make.calls) == 2 and verify(path)
    assert evicted == [(K1, {"t2l:one"})]  # vLLM must not keep reading the bad folder under that name
    assert sorted(p.name for p in tmp_path.iterdir()) == [K1]


def test_truncated_file_of_a_replica_is_not_adopted(tmp_path):
    asyncio.run(AdapterCache(tmp_path).get(K1, Maker()))
    weights = tmp_path / K1 / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    make = Maker()
    path, hit = asyncio.run(AdapterCache(tmp_path).get(K1, make))
    assert not hit and len(make.calls) == 1 and verify(path)


@pytest.mark.parametrize("damage", ["no manifest", "half-written"])
def test_folder_without_a_valid_manifest_is_never_trusted(tmp_path, damage):
    """A folder of an older version, or one a killed process left where a folder belongs."""
    (tmp_path / K1).mkdir()
    (tmp_path / K1 / READY).write_text("{}")
    if damage == "half-written":
        (tmp_path / K1 / MANIFEST).write_text('{"files": {')
    cache = AdapterCache(tmp_path)
    assert (K1 in cache.entries) == (damage == "half-written")  # adopted by name, checked before use
    make = Maker()
    path, hit = asyncio.run(cache.get(K1, make))
    assert not hit and len(make.calls) == 1 and verify(path)


def test_eviction_keeps_a_folder_another_replica_serves(tmp_path):
    grace = 0.2
    a = AdapterCache(tmp_path, CacheLimits(max_adapters=1, grace_s=grace))
    b = AdapterCache(tmp_path, CacheLimits(max_adapters=8, grace_s=grace))

    async def main():
        await a.get(K1, Maker())
        await b.get(K1, Maker())  # b serves K1 too, and renews its lease every grace / 4
        await a.get(K2, Maker())  # a evicts K1
        await asyncio.sleep(3 * grace)
        await a.get(K3, Maker())  # a's sweep: K1's grace is over, but b touched it within the grace
        assert K1 not in a.retired and verify(tmp_path / K1)
        b.limits = CacheLimits(max_adapters=0, grace_s=grace)
        await b.get(K4, Maker())  # now b lets go of K1 (and K4) too
        await asyncio.sleep(3 * grace)
        b._refresh()

    asyncio.run(main())
    assert not (tmp_path / K1).exists()  # the last replica to let go deleted it


def test_names_per_adapter_are_bounded(tmp_path):
    from vllm_t2l.serving.cache import MAX_NAMES

    cache, evicted = recording_cache(tmp_path)
    asyncio.run(cache.get(K1, Maker()))
    spellings = [f"t2l:one{' ' * i}" for i in range(MAX_NAMES + 3)]
    for name in spellings:
        assert cache.register(K1, name)
    assert list(cache.entries[K1].names) == spellings[3:]
    assert evicted == [(K1, {n}) for n in spellings[:3]]


def test_register_after_eviction_is_refused(tmp_path):
    cache = AdapterCache(tmp_path, CacheLimits(max_adapters=1, grace_s=60))

    async def main():
        await cache.get(K1, Maker())
        await cache.get(K2, Maker())

    asyncio.run(main())
    assert not cache.register(K1, "t2l:one")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (as root) or a read-only folder (otherwise): a cache disk that refuses writes."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                          capture_output=True).returncode:
            pytest.skip("running as root without permission to mount a small tmpfs")
        yield disk
        subprocess.run(["umount", str(disk)], check=True)
    else:
        yield disk
        disk.chmod(0o755)


def test_full_or_read_only_disk_fails_the_request_and_leaves_nothing(full_disk):
    cache = AdapterCache(full_disk)
    if os.geteuid() != 0:
        full_disk.chmod(0o555)
    with pytest.raises(OSError) as err:
        asyncio.run(cache.get(K1, Maker(size=1 << 20)))
    assert err.value.errno in (28, 13, 30)  # ENOSPC, EACCES, EROFS
    assert K1 not in cache.entries and cache._inflight == {}
    assert [p.name for p in full_disk.iterdir()] == []
    path, hit = asyncio.run(cache.get(K2, Maker(size=10))) if os.geteuid() == 0 else (None, None)
    if path is not None:  # the disk has room again for a small one: the cache still works
        assert not hit and verify(path)
