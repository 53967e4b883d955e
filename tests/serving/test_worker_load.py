"""Tests for vllm_t2l.serving.worker_load: vLLM's loader reads our folders in one call, others as before."""

from __future__ import annotations

import gc
import logging
import shutil

import pytest
import torch
from conftest import rand_lora
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper

from vllm_t2l import codes
from vllm_t2l.lora import METADATA_FILE, WEIGHTS_FILE
from vllm_t2l.names import parse
from vllm_t2l.serving import worker_load

EXPECTED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module", autouse=True)
def installed():
    assert worker_load.install()
    assert worker_load.install()  # idempotent


def load(folder, expected=EXPECTED, dtype=torch.bfloat16, **kw) -> LoRAModel:
    peft = PEFTHelper.from_local_dir(str(folder), 2048)
    return LoRAModel.from_local_checkpoint(str(folder), expected, peft, lora_model_id=7, device="cpu",
                                           dtype=dtype, **kw)


@pytest.fixture
def folders(tmp_path):
    """The same adapter as one of our folders (with the sidecar) and as a plain PEFT folder."""
    ours = rand_lora(0, modules=("q_proj", "v_proj", "down_proj")).save_peft(tmp_path / "ours", "tiny-llama",
                                                                              {"checkpoint": "abc"})
    plain = shutil.copytree(ours, tmp_path / "plain")
    (plain / METADATA_FILE).unlink()
    return ours, plain


def test_our_folders_load_as_vllm_loads_them(folders, monkeypatch):
    read = []
    monkeypatch.setattr(worker_load, "read_ours",
                        lambda d, h, t, f=worker_load.read_ours: read.append(d) or f(d, h, t))
    ours, plain = load(folders[0]), load(folders[1])
    assert read == [folders[0], folders[1]]  # the plain folder is looked at, then left to vLLM
    assert ours.id == plain.id == 7 and ours.rank == plain.rank and ours.loras.keys() == plain.loras.keys()
    assert len(ours.loras) == 9
    for name, lora in plain.loras.items():
        fast = ours.loras[name]
        assert fast.lora_a.dtype == torch.bfloat16 and fast.scaling == lora.scaling
        assert torch.equal(fast.lora_a, lora.lora_a) and torch.equal(fast.lora_b, lora.lora_b), name


def test_unexpected_modules_get_vllms_error(folders):
    with pytest.raises(ValueError, match="expected target modules"):
        load(folders[0], expected={"q_proj", "v_proj"})


def test_unreadable_weights_fall_back_to_vllms_loader(folders, caplog):
    (folders[0] / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with caplog.at_level(logging.WARNING, logger="vllm.t2l"), pytest.raises(Exception) as err:
        load(folders[0])
    assert "fast path" in caplog.text and "not read" in caplog.text
    assert type(err.value).__module__.startswith("safetensors") or "header" in str(err.value).lower()


def test_special_loads_go_to_vllm(folders, monkeypatch):
    monkeypatch.setattr(worker_load, "read_ours", lambda d, h, t: pytest.fail("fast path taken"))
    load(folders[0], skip_prefixes=["mtp."])
    peft = PEFTHelper.from_local_dir(str(folders[0]), 2048)
    assert LoRAModel.from_local_checkpoint(str(folders[0]), EXPECTED, peft, device="cpu").loras


def test_codes_folders_load_as_their_full_weights(zgen, tmp_path):
    spec = parse("t2l-mix:0.6*Talk like a pirate.||0.4*Be kind.")
    c = zgen.checkpoint.config
    full = zgen.generate([spec])[0].save_peft(tmp_path / "full", "tiny-llama")
    codes.save(tmp_path / "codes", zgen.codes([spec])[0], codes.save_basis(tmp_path, zgen.checkpoint.hypernet),
               "tiny-llama", c.alpha, c.use_rslora, {"checkpoint": zgen.id})
    want, got = load(full), load(tmp_path / "codes")
    assert got.loras.keys() == want.loras.keys() and len(got.loras) == 6
    for name, lora in want.loras.items():
        assert torch.equal(got.loras[name].lora_a, lora.lora_a) and torch.equal(got.loras[name].lora_b, lora.lora_b)


def test_an_adapters_buffers_are_reused_once_it_is_gone(zgen, tmp_path):
    c = zgen.checkpoint.config
    basis = codes.save_basis(tmp_path, zgen.checkpoint.hypernet)
    for i, desc in enumerate(["Talk like a pirate.", "Be kind."]):
        codes.save(tmp_path / str(i), zgen.codes([parse("t2l:" + desc)])[0], basis, "tiny-llama", c.alpha,
                   c.use_rslora, {"checkpoint": zgen.id})

    def ptrs(lora: LoRAModel) -> set[int]:
        return {t.untyped_storage().data_ptr() for w in lora.loras.values() for t in (w.lora_a, w.lora_b)}

    first = load(tmp_path / "0", dtype=torch.float32)
    kept = {name: w.lora_a.clone() for name, w in first.loras.items()}
    second = load(tmp_path / "1", dtype=torch.float32)
    assert not ptrs(first) & ptrs(second)  # a live adapter's memory is never handed out
    assert all(torch.equal(first.loras[name].lora_a, a) for name, a in kept.items())
    used, free = ptrs(first), worker_load.BUFFERS.free()
    del first
    gc.collect()
    assert worker_load.BUFFERS.free() == free + 4  # A and B of q_proj and v_proj
    third = load(tmp_path / "0", dtype=torch.float32)
    assert ptrs(third) == used and all(torch.equal(third.loras[name].lora_a, a) for name, a in kept.items())
