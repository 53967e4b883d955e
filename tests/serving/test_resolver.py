"""Tests for vllm_t2l.serving.resolver.T2LResolver without a server: generation and its metrics."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from prometheus_client import REGISTRY

from vllm_t2l import checkpoint as ckpt_mod
from vllm_t2l import codes
from vllm_t2l.generator import Generator
from vllm_t2l.lora import WEIGHTS_FILE
from vllm_t2l.names import parse
from vllm_t2l.serving.resolver import Settings, T2LResolver

pytestmark = pytest.mark.usefixtures("one_thread")
STAGES = ("embed", "hypernet", "write")


def _stage_count(stage: str) -> float:
    return REGISTRY.get_sample_value("vllm_t2l:stage_seconds_count", {"stage": stage}) or 0.0


@pytest.mark.parametrize("coded", [False, True], ids=["full weights", "codes"])
def test_write_saves_folders_and_observes_each_stage_once_per_batch(coded, tiny_checkpoint, minilm, tmp_path):
    resolver = T2LResolver(Settings())
    resolver.generator = Generator(ckpt_mod.load(tiny_checkpoint), minilm)
    resolver.base_model = "tiny-llama"
    if coded:
        resolver.basis = codes.save_basis(tmp_path, resolver.generator.checkpoint.hypernet)
    before = {s: _stage_count(s) for s in STAGES}
    jobs = [(parse("t2l:Talk like a pirate."), tmp_path / "a"), (parse("t2l:Be brief."), tmp_path / "b")]
    resolver._write(jobs)
    for _, folder in jobs:
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
        assert ((folder / codes.CODES_FILE).exists(), (folder / WEIGHTS_FILE).exists()) == (coded, not coded)
    for stage in STAGES:
        assert _stage_count(stage) == before[stage] + 1
        assert REGISTRY.get_sample_value("vllm_t2l:stage_seconds_sum", {"stage": stage}) > 0


@pytest.mark.parametrize("reads_codes", [False, True], ids=["vLLM reads weights", "vLLM reads codes"])
def test_each_hand_off_keeps_its_own_cache(reads_codes, tiny_checkpoint, monkeypatch, tmp_path):
    """Codes folders are only readable through our worker loader: a server without it never adopts them."""
    from conftest import TINY_CONFIG

    from vllm_t2l.serving import worker_load

    monkeypatch.setattr(worker_load, "installed", lambda: reads_codes)
    resolver = T2LResolver(Settings(checkpoint=str(tiny_checkpoint), cache_dir=str(tmp_path)))
    resolver.start(TINY_CONFIG, "tiny-llama", max_lora_rank=8)
    kind = "codes" if reads_codes else "weights"
    assert resolver.cache.root == tmp_path / resolver.generator.id / kind
    assert (resolver.basis == resolver.cache.root / codes.BASIS_FILE) if reads_codes else resolver.basis is None


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_start_on_cpu_sets_the_threads_asked_for(threads, tiny_checkpoint, monkeypatch, tmp_path):
    """vLLM's CPU worker leaves one core to the API server; the resolver keeps to it unless told otherwise."""
    import torch
    from conftest import TINY_CONFIG

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    resolver = T2LResolver(Settings(checkpoint=str(tiny_checkpoint), cache_dir=str(tmp_path), device="cpu",
                                    cpu_threads=threads))
    resolver.start(TINY_CONFIG, "tiny-llama", max_lora_rank=8)
    assert calls == ([threads] if threads else [])


def test_names_it_does_not_own_resolve_to_none():
    """Other resolvers (vLLM's filesystem resolver) see every name that is not t2l:/t2l-mix:."""
    assert asyncio.run(T2LResolver(Settings()).resolve_lora("base", "my-adapter")) is None


def _started(tiny_checkpoint, tmp_path) -> T2LResolver:
    from conftest import TINY_CONFIG

    resolver = T2LResolver(Settings(checkpoint=str(tiny_checkpoint), cache_dir=str(tmp_path / "cache")))
    resolver.start(TINY_CONFIG, "tiny-llama", max_lora_rank=8)
    return resolver


def test_hypernetwork_exception_fails_that_request_and_the_next_works(tiny_checkpoint, monkeypatch, tmp_path):
    from vllm_t2l.serving.resolver import AdapterRequestError

    resolver = _started(tiny_checkpoint, tmp_path)
    real = resolver.generator.codes if resolver.basis else resolver.generator.generate
    calls = []

    def explode_once(specs, timings=None):
        calls.append(len(specs))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(specs, timings)

    monkeypatch.setattr(resolver.generator, "codes" if resolver.basis else "generate", explode_once)
    errors = REGISTRY.get_sample_value("vllm_t2l:generation_errors_total") or 0.0
    with pytest.raises(AdapterRequestError, match="adapter generation failed") as err:
        asyncio.run(resolver.resolve("t2l:Talk like a pirate."))
    assert "CUDA" not in str(err.value)  # details stay in the server log
    assert REGISTRY.get_sample_value("vllm_t2l:generation_errors_total") == errors + 1
    key, path, hit = asyncio.run(resolver.resolve("t2l:Talk like a pirate."))
    assert not hit and (path / "adapter_config.json").is_file() and calls == [1, 1]


def test_engine_name_is_the_content_id(tiny_checkpoint, tmp_path):
    resolver = _started(tiny_checkpoint, tmp_path)
    desc = "t2l:My private system prompt: never reveal the launch date."
    request = asyncio.run(resolver.resolve_lora("tiny-llama", desc))
    assert request.lora_name == "t2l-" + parse(desc).content_id(resolver.generator.id)
    assert "private" not in request.lora_name and "private" not in request.lora_path


@pytest.mark.parametrize("errno_, message", [(30, "read-only"), (28, "full"), (13, "read-only")])
def test_cache_disk_errors_are_named(errno_, message, tiny_checkpoint, monkeypatch, tmp_path):
    from vllm_t2l.serving.resolver import AdapterRequestError

    resolver = _started(tiny_checkpoint, tmp_path)

    def refuse(jobs):
        raise OSError(errno_, os.strerror(errno_), str(jobs[0][1]))

    monkeypatch.setattr(resolver, "_write", refuse)
    with pytest.raises(AdapterRequestError, match=message) as err:
        asyncio.run(resolver.resolve("t2l:Be brief."))
    assert str(tmp_path) not in str(err.value)  # no server path in what the client reads


def test_start_on_a_read_only_cache_then_recover(tiny_checkpoint, monkeypatch, tmp_path):
    """A read-only cache disk at start: the server starts (base requests work), t2l: requests get a 400
    naming the problem, and generation works once the disk is writable again."""
    import subprocess

    from vllm_t2l.serving import worker_load
    from vllm_t2l.serving.resolver import AdapterRequestError

    monkeypatch.setattr(worker_load, "installed", lambda: True)  # the codes hand-off: a basis file at start
    disk = tmp_path / "disk"
    disk.mkdir()
    kind = disk / ckpt_mod.load(tiny_checkpoint).id / "codes"
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(disk)], capture_output=True).returncode:
            pytest.skip("running as root without permission to mount a tmpfs")
        kind.mkdir(parents=True)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        writable = ["mount", "-o", "remount,rw", str(disk)]
    else:
        kind.mkdir(parents=True)
        kind.chmod(0o555)
        writable = ["chmod", "755", str(kind)]
    try:
        from conftest import TINY_CONFIG

        resolver = T2LResolver(Settings(checkpoint=str(tiny_checkpoint), cache_dir=str(disk)))
        resolver.start(TINY_CONFIG, "tiny-llama", max_lora_rank=8)
        with pytest.raises(AdapterRequestError, match="read-only"):
            asyncio.run(resolver.resolve("t2l:Be brief."))
        subprocess.run(writable, check=True)
        key, path, hit = asyncio.run(resolver.resolve("t2l:Be brief."))
        assert not hit and (kind / codes.BASIS_FILE).is_file() and path.parent == kind
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(disk)], check=True)


def test_a_follow_checkpoint_serves_strength_one_within_rank_8_and_says_why_above(tmp_path, tiny_shapes):
    from conftest import TINY_CONFIG, make_hypernet

    from vllm_t2l.checkpoint import Checkpoint
    from vllm_t2l.embed import EmbedderConfig
    from vllm_t2l.models import DEFAULT_EMBEDDER_NAME
    from vllm_t2l.serving.resolver import AdapterRequestError

    net = make_hypernet("zhyper-diag", tiny_shapes, follow=True)
    folder = Checkpoint(net, EmbedderConfig(name=DEFAULT_EMBEDDER_NAME, dim=384)).save(tmp_path / "ckpt")
    resolver = T2LResolver(Settings(checkpoint=str(folder), cache_dir=str(tmp_path / "cache")))
    resolver.start(TINY_CONFIG, "tiny-llama", max_lora_rank=8)
    _, path, hit = asyncio.run(resolver.resolve("t2l:Be brief."))
    assert not hit and json.loads((path / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(AdapterRequestError, match="rank 16, above the server's --max-lora-rank 8; use strength 1"):
        asyncio.run(resolver.resolve("t2l[strength=2]:Be brief."))
