"""Tests for vllm_t2l.checkpoint: the own format and its validation (the importer: test_t2l_folder.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, make_hypernet
from safetensors.torch import load_file, save_file

from vllm_t2l import checkpoint as ckpt_mod
from vllm_t2l.checkpoint import CONFIG, WEIGHTS, Checkpoint, CheckpointError
from vllm_t2l.embed import EmbedderConfig
from vllm_t2l.hypernet import ARCHS, BaseShapes, HyperNet

pytestmark = pytest.mark.usefixtures("one_thread")

EMB_CFG = EmbedderConfig(name="sentence-transformers/all-MiniLM-L6-v2", dim=384)


def _emb(n: int = 3, dim: int = 384) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(5)) * 2


def assert_same_outputs(a: HyperNet, b: HyperNet, emb: torch.Tensor | None = None) -> None:
    emb = _emb() if emb is None else emb
    with torch.no_grad():
        oa, ob = a(emb), b(emb)
    assert list(oa) == list(ob)
    for m in oa:
        torch.testing.assert_close(oa[m][0], ob[m][0], rtol=0, atol=0)
        torch.testing.assert_close(oa[m][1], ob[m][1], rtol=0, atol=0)


def _save(net: HyperNet, folder: Path, **kw) -> Path:
    return Checkpoint(net, EMB_CFG, **kw).save(folder)


# ---- own format --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(arch, tmp_path, tiny_shapes):
    net = make_hypernet(arch, tiny_shapes, seed=3)
    ck = Checkpoint(net, EMB_CFG, trained=True, card={"note": "hi"})
    folder = ck.save(tmp_path / "c")
    assert ck.id and len(ck.id) == 16
    back = ckpt_mod.load(folder)
    assert back.id == ck.id
    assert back.config == net.config
    assert back.base == tiny_shapes
    assert back.embedder == EMB_CFG
    assert back.trained is True and back.card == {"note": "hi"}
    assert not back.hypernet.training
    assert_same_outputs(net, back.hypernet)


def test_a_follow_network_round_trips(tmp_path, tiny_shapes):
    net = make_hypernet("zhyper-diag", tiny_shapes, seed=3, follow=True)
    back = ckpt_mod.load(Checkpoint(net, EMB_CFG).save(tmp_path / "c"))
    assert back.config.follow and back.hypernet.follow is not None
    assert_same_outputs(net, back.hypernet)
    with torch.no_grad():
        x = torch.randn(2, EMB_CFG.dim)
        assert all(torch.equal(a, b) for a, b in zip(net.codes(x).values(), back.hypernet.codes(x).values()))


@pytest.mark.parametrize("card,want", [({}, 1.0), ({"recommended_strength": 2}, 2.0),
                                       ({"recommended_strength": "2"}, 1.0), ({"recommended_strength": 9}, 1.0)])
def test_recommended_strength_comes_from_the_card(card, want, tiny_shapes):
    assert Checkpoint(make_hypernet("zhyper-diag", tiny_shapes), EMB_CFG, card=card).recommended_strength == want


def test_config_json_contents(tiny_checkpoint):
    meta = json.loads((tiny_checkpoint / CONFIG).read_text())
    assert meta["format"] == "vllm-t2l" and meta["version"] == 2
    assert meta["hypernet"]["arch"] == "zhyper-diag"
    assert meta["base"]["n_layers"] == 3
    assert meta["embedder"]["dim"] == 384
    assert meta["trained"] is False


def test_id_is_stable_and_tracks_weights(tmp_path, tiny_shapes):
    net = make_hypernet("t2l-L", tiny_shapes, seed=1)
    a = Checkpoint(net, EMB_CFG)
    a.save(tmp_path / "a")
    b = Checkpoint(net, EMB_CFG)
    b.save(tmp_path / "b")
    assert a.id == b.id == ckpt_mod.load(tmp_path / "a").id
    with torch.no_grad():
        net.heads["q_proj"].bias[0] += 1e-3
    c = Checkpoint(net, EMB_CFG)
    c.save(tmp_path / "c")
    assert c.id != a.id
    d = Checkpoint(make_hypernet("t2l-L", tiny_shapes, seed=1), EMB_CFG, trained=True)
    d.save(tmp_path / "d")
    assert d.id != a.id  # the config is part of the id too
    e = Checkpoint(make_hypernet("t2l-L", tiny_shapes, seed=1), EMB_CFG, card={"note": "edited"})
    e.save(tmp_path / "e")
    assert e.id == a.id  # the card is documentation, not part of the id


def test_check_base(tiny_checkpoint):
    ck = ckpt_mod.load(tiny_checkpoint)
    ck.check_base(BaseShapes.from_config(TINY_CONFIG, ("q_proj", "v_proj"), name="served"))
    other = BaseShapes.from_config(dict(TINY_CONFIG, num_key_value_heads=4), ("q_proj", "v_proj"),
                                   name="other-model")
    with pytest.raises(CheckpointError) as e:
        ck.check_base(other)
    msg = str(e.value)
    assert "v_proj" in msg and "(64, 32)" in msg and "(64, 64)" in msg
    assert "q_proj" not in msg and "'other-model'" in msg and "'tiny-llama'" in msg
    deeper = BaseShapes.from_config(dict(TINY_CONFIG, num_hidden_layers=4), ("q_proj", "v_proj"))
    with pytest.raises(CheckpointError, match="layers: 3 vs 4"):
        ck.check_base(deeper)


# ---- own format: refusals ----------------------------------------------------------------------

def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ckpt_mod.load(tmp_path)


def test_invalid_json(tiny_checkpoint):
    (tiny_checkpoint / CONFIG).write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ckpt_mod.load(tiny_checkpoint)


@pytest.mark.parametrize("change", [{"format": "peft"}, {"version": 3}, {"format": None}])
def test_wrong_format_or_version(tiny_checkpoint, change):
    meta = json.loads((tiny_checkpoint / CONFIG).read_text())
    meta.update(change)
    (tiny_checkpoint / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected format 'vllm-t2l' version 2"):
        ckpt_mod.load(tiny_checkpoint)


def _as_version_1(folder: Path) -> None:
    meta = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps(dict(meta, version=1)))


@pytest.mark.parametrize("arch", ["t2l-L", "t2l-M", "t2l-S"])
def test_version_1_t2l_is_refused(arch, tmp_path, tiny_shapes):
    """Version 1 t2l-* checkpoints ran the old wiring: the same keys read by the new one would be misread."""
    folder = _save(make_hypernet(arch, tiny_shapes), tmp_path / "c")
    _as_version_1(folder)
    with pytest.raises(CheckpointError, match="earlier T2L wiring") as e:
        ckpt_mod.load(folder)
    assert "import-t2l" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["zhyper-diag", "zhyper-square"])
def test_version_1_zhyper_still_loads(arch, tmp_path, tiny_shapes):
    net = make_hypernet(arch, tiny_shapes, seed=2)
    folder = _save(net, tmp_path / "c")
    _as_version_1(folder)
    assert_same_outputs(net, ckpt_mod.load(folder).hypernet)


def test_shipped_checkpoints_are_zhyper():
    """Zhyper's wiring never changed, so those written as version 1 keep loading unchanged beside version 2."""
    folders = sorted((Path(ckpt_mod.__file__).parent / "checkpoints").iterdir())
    assert folders
    for folder in folders:
        meta = json.loads((folder / CONFIG).read_text())
        assert meta["hypernet"]["arch"].startswith("zhyper") and meta["version"] in (1, 2)
        assert ckpt_mod.load(folder).id


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("hypernet"),
    lambda m: m["hypernet"].update(arch="t2l-XL"),
    lambda m: m["hypernet"].update(bogus=1),
    lambda m: m["embedder"].pop("dim"),
    lambda m: m["base"].pop("modules"),
])
def test_incomplete_config(tiny_checkpoint, edit):
    meta = json.loads((tiny_checkpoint / CONFIG).read_text())
    edit(meta)
    (tiny_checkpoint / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="incomplete or invalid"):
        ckpt_mod.load(tiny_checkpoint)


def test_config_not_an_object(tiny_checkpoint):
    (tiny_checkpoint / CONFIG).write_text("[1, 2]")
    with pytest.raises(CheckpointError):
        ckpt_mod.load(tiny_checkpoint)


def test_missing_weights(tiny_checkpoint):
    (tiny_checkpoint / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="hypernet.safetensors cannot be read"):
        ckpt_mod.load(tiny_checkpoint)


@pytest.mark.parametrize("keep", [0, 5, 100, -64])
def test_truncated_weights(tiny_checkpoint, keep):
    data = (tiny_checkpoint / WEIGHTS).read_bytes()
    (tiny_checkpoint / WEIGHTS).write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt_mod.load(tiny_checkpoint)


def test_garbage_weights(tiny_checkpoint):
    (tiny_checkpoint / WEIGHTS).write_bytes(b"\xff" * 4096)
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt_mod.load(tiny_checkpoint)


def test_wrong_tensor_shape_names_key(tiny_checkpoint):
    state = load_file(tiny_checkpoint / WEIGHTS)
    state["heads.q_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tiny_checkpoint / WEIGHTS)
    with pytest.raises(CheckpointError) as e:
        ckpt_mod.load(tiny_checkpoint)
    assert "heads.q_proj.weight" in str(e.value) and "shape mismatch" in str(e.value)
    assert "(3, 3)" in str(e.value)


def test_missing_and_unexpected_keys(tiny_checkpoint):
    state = load_file(tiny_checkpoint / WEIGHTS)
    state["extra.weight"] = state.pop("block1.mlp.1.bias")
    save_file(state, tiny_checkpoint / WEIGHTS)
    with pytest.raises(CheckpointError) as e:
        ckpt_mod.load(tiny_checkpoint)
    assert "missing ['block1.mlp.1.bias']" in str(e.value)
    assert "unexpected ['extra.weight']" in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights(tiny_checkpoint, bad):
    state = load_file(tiny_checkpoint / WEIGHTS)
    state["mixer.1.weight"][0, 0] = bad
    save_file(state, tiny_checkpoint / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in \['mixer.1.weight'\]"):
        ckpt_mod.load(tiny_checkpoint)


def test_own_loader_refuses_t2l_folder(tmp_path):
    (tmp_path / "hypermod.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="import-t2l"):
        ckpt_mod.load(tmp_path)
