"""Tests for vllm_t2l.codes: a Zhyper adapter written as codes expands to exactly the generated adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import recording, tiny_generator

from vllm_t2l import codes
from vllm_t2l.lora import CONFIG_FILE, METADATA_FILE
from vllm_t2l.names import parse

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["t2l:Talk like a pirate.", "t2l-mix:0.7*Talk like a pirate.||-0.3*Be kind.",
         "t2l-mix[emb]:0.5*Answer tersely.||0.5*Be kind."]


@pytest.fixture(scope="module")
def square(tmp_path_factory, minilm):
    return tiny_generator("zhyper-square", tmp_path_factory.mktemp("square"), minilm, seed=2)


@pytest.mark.parametrize("which", ["zgen", "square", "fgen"])
def test_codes_folders_expand_to_the_generated_adapter(which, request, tmp_path):
    gen = request.getfixturevalue(which)
    specs = [parse(n) for n in [*NAMES, "t2l[strength=2]:Talk like a pirate."]]
    basis = codes.save_basis(tmp_path, gen.checkpoint.hypernet)
    c = gen.checkpoint.config
    for i, (spec, z, want) in enumerate(zip(specs, gen.codes(specs), gen.generate(specs))):
        folder, alpha = tmp_path / str(i), c.alpha_for(gen.rank_of(spec))
        codes.save(folder, z, basis, "tiny-llama", alpha, c.use_rslora, {"checkpoint": gen.id})
        handed = []
        pooled = codes.expand(folder, alpha, c.use_rslora, recording(handed))
        for got in (codes.expand(folder, alpha, c.use_rslora), pooled):
            assert (got.alpha, got.use_rslora, got.rank) == (want.alpha, want.use_rslora, want.rank)
            for m in want.A:
                assert torch.equal(got.A[m], want.A[m]) and torch.equal(got.B[m], want.B[m])
        assert ({t.untyped_storage().data_ptr() for t in [*pooled.A.values(), *pooled.B.values()]}
                == {b.data_ptr() for b in handed})
        config = json.loads((folder / CONFIG_FILE).read_text())
        assert (config["r"], config["lora_alpha"], config["target_modules"]) == (gen.rank_of(spec), alpha,
                                                                                 ["q_proj", "v_proj"])
        meta = json.loads((folder / METADATA_FILE).read_text())
        assert meta == {"checkpoint": gen.id, "basis": f"../{codes.BASIS_FILE}"}


def test_a_moved_cache_still_finds_its_basis(zgen, tmp_path):
    c = zgen.checkpoint.config
    z = zgen.codes([parse(NAMES[0])])[0]
    (tmp_path / "old").mkdir()
    basis = codes.save_basis(tmp_path / "old", zgen.checkpoint.hypernet)
    codes.save(tmp_path / "old" / "a", z, basis, "m", c.alpha, c.use_rslora, {})
    (tmp_path / "old").rename(tmp_path / "new")
    got, want = codes.expand(tmp_path / "new" / "a", c.alpha, c.use_rslora), zgen.generate([parse(NAMES[0])])[0]
    assert all(torch.equal(got.A[m], want.A[m]) for m in want.A)


def test_codes_are_small(zgen, tmp_path):
    basis = codes.save_basis(tmp_path, zgen.checkpoint.hypernet)
    codes.save(tmp_path / "a", zgen.codes([parse(NAMES[0])])[0], basis, "m", 16.0, True, {})
    full = zgen.generate([parse(NAMES[0])])[0].save_peft(tmp_path / "full", "m")
    size = sum(f.stat().st_size for f in (tmp_path / "a").iterdir())
    assert size < sum(f.stat().st_size for f in full.iterdir()) / 3


def test_basis_is_written_once(zgen, tmp_path):
    path = codes.save_basis(tmp_path, zgen.checkpoint.hypernet)
    stamp = path.stat().st_mtime_ns
    assert codes.save_basis(tmp_path, zgen.checkpoint.hypernet) == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [codes.BASIS_FILE]  # no partial file left behind


def test_expanded_tensors_are_the_callers(zgen, tmp_path):
    """vLLM scales a loaded adapter's B in place; that must not reach the shared basis."""
    c = zgen.checkpoint.config
    codes.save(tmp_path / "a", zgen.codes([parse(NAMES[0])])[0], codes.save_basis(tmp_path, zgen.checkpoint.hypernet),
               "m", c.alpha, c.use_rslora, {})
    first = codes.expand(tmp_path / "a", c.alpha, c.use_rslora)
    want = {m: b.clone() for m, b in first.B.items()}
    for m in first.A:
        first.A[m].mul_(3)
        first.B[m].mul_(3)
    again = codes.expand(tmp_path / "a", c.alpha, c.use_rslora)
    assert all(torch.equal(again.B[m], want[m]) for m in want)
