"""Tests for vllm_t2l.serving.resolver.T2LResolver without a server: generation and its metrics."""

from __future__ import annotations

import asyncio
import json

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
