"""Tests for vllm_t2l.checkpoint: the own format, its validation, and the Text-to-LoRA importer."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CONFIG, make_hypernet
from safetensors.torch import load_file, save_file

from vllm_t2l import checkpoint as ckpt_mod
from vllm_t2l.checkpoint import _T2L_KEYS, CONFIG, WEIGHTS, Checkpoint, CheckpointError, import_t2l
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


def test_config_json_contents(tiny_checkpoint):
    meta = json.loads((tiny_checkpoint / CONFIG).read_text())
    assert meta["format"] == "vllm-t2l" and meta["version"] == 1
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


@pytest.mark.parametrize("change", [{"format": "peft"}, {"version": 2}, {"format": None}])
def test_wrong_format_or_version(tiny_checkpoint, change):
    meta = json.loads((tiny_checkpoint / CONFIG).read_text())
    meta.update(change)
    (tiny_checkpoint / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected format 'vllm-t2l' version 1"):
        ckpt_mod.load(tiny_checkpoint)


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


# ---- published Text-to-LoRA folders ------------------------------------------------------------

def to_t2l_state(net: HyperNet, with_offsets: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict under Text-to-LoRA's key names (the inverse of checkpoint._T2L_KEYS)."""
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("offset_"):
            if with_offsets:
                out["AB_offset." + key[len("offset_"):]] = value.clone()
            continue
        if key == "ab_emb":
            continue
        for theirs, mine in _T2L_KEYS:
            if key.startswith(mine):
                out[theirs + key[len(mine):]] = value.clone()
                break
        else:
            raise AssertionError(f"no Text-to-LoRA name for {key}")
    return out


def write_t2l_folder(folder: Path, net: HyperNet, state: object, **args_extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    c = net.config
    torch.save(state, folder / "hypermod.pt")
    args = {"model_dir": "tiny-llama", "emb_model": "Alibaba-NLP/gte-large-en-v1.5",
            "hypernet_latent_size": c.latent, "head_in_size": c.head_in,
            "target_modules": list(c.target_modules), "autoreg_gen": False, "shared_AB_head": False,
            "learnable_AB_offset": True, **args_extra}
    (folder / "args.yaml").write_text(yaml.safe_dump(args))
    lora = {"peft_type": "LORA", "r": c.rank, "lora_alpha": c.alpha, "use_rslora": c.use_rslora,
            "target_modules": list(c.target_modules)}
    (folder / "adapter_config.json").write_text(json.dumps(lora))
    return folder


def test_t2l_state_uses_their_names(tiny_shapes):
    keys = set(to_t2l_state(make_hypernet("t2l-L", tiny_shapes)))
    for k in ["task_encoder.mlp.0.weight", "task_encoder.mlp.1.weight", "layer_depth_encoder.0.weight",
              "layer_depth_encoder.1.bias", "layer_type_encoder.0.weight", "layer_type_encoder.1.weight",
              "mixer.1.weight", "mixer.4.bias", "mlp1.mlp.0.weight", "mlp1.mlp.1.weight",
              "mlp1.mlp.4.bias", "mlp2.mlp.0.bias", "mlp2.mlp.1.weight", "mlp2.mlp.4.weight",
              "mlp3.0.weight", "mlp3.1.weight", "mlp3.4.bias", "heads.q_proj.weight",
              "heads.q_proj.bias", "heads.v_proj.weight", "heads.v_proj.bias", "AB_offset.q_proj"]:
        assert k in keys, k


def test_import_t2l_L(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes, seed=11)
    folder = write_t2l_folder(tmp_path / "t2l", src, to_t2l_state(src))
    ck = import_t2l(folder, tiny_config_dir)
    assert ck.config.arch == "t2l-L"
    assert ck.config.rank == 8 and ck.config.alpha == 16.0 and ck.config.use_rslora is True
    assert ck.config.target_modules == ("q_proj", "v_proj")
    assert ck.base.modules == tiny_shapes.modules and ck.base.name == "tiny-llama"
    assert ck.embedder.dim == 384 and ck.embedder.pooling == "cls"
    assert ck.embedder.name == "Alibaba-NLP/gte-large-en-v1.5"
    assert ck.trained is True and ck.card["arch"] == "t2l-L"
    assert_same_outputs(src, ck.hypernet)
    # and it survives our own format
    ck.save(tmp_path / "own")
    assert_same_outputs(src, ckpt_mod.load(tmp_path / "own").hypernet)
    # an explicit embedder path wins over args.yaml
    assert import_t2l(folder, tiny_config_dir, embedder_path="/models/gte").embedder.name == "/models/gte"


def test_import_t2l_without_offsets(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes, seed=12)
    folder = write_t2l_folder(tmp_path / "t2l", src, to_t2l_state(src, with_offsets=False))
    ck = import_t2l(folder, tiny_config_dir)
    for m in src.modules_:
        getattr(src, f"offset_{m}").zero_()
    assert_same_outputs(src, ck.hypernet)


def test_import_t2l_M(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-M", tiny_shapes, seed=13)
    state = to_t2l_state(src)
    g = torch.Generator().manual_seed(0)
    latent = src.config.latent
    state["out_emb.weight"] = torch.randn(2, latent, generator=g)
    state["out_emb_norm.weight"] = 1 + 0.1 * torch.randn(latent, generator=g)
    state["out_emb_norm.bias"] = 0.1 * torch.randn(latent, generator=g)
    with torch.no_grad():  # what their A/B selector looks like after its LayerNorm
        src.ab_emb.copy_(torch.nn.functional.layer_norm(
            state["out_emb.weight"], (latent,), state["out_emb_norm.weight"], state["out_emb_norm.bias"]))
    folder = write_t2l_folder(tmp_path / "t2l", src, state, shared_AB_head=True)
    ck = import_t2l(folder, tiny_config_dir)
    assert ck.config.arch == "t2l-M" and ck.card["arch"] == "t2l-M"
    assert_same_outputs(src, ck.hypernet)


def test_import_t2l_S_refused(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes)
    folder = write_t2l_folder(tmp_path / "t2l", src, to_t2l_state(src), autoreg_gen=True)
    with pytest.raises(CheckpointError, match="autoreg_gen"):
        import_t2l(folder, tiny_config_dir)


def test_import_t2l_wrong_base(tmp_path, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes)
    folder = write_t2l_folder(tmp_path / "t2l", src, to_t2l_state(src))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(TINY_CONFIG, hidden_size=128)))
    with pytest.raises(CheckpointError, match="heads.q_proj"):
        import_t2l(folder, other)


def test_import_t2l_missing_files(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes)
    folder = write_t2l_folder(tmp_path / "t2l", src, to_t2l_state(src))
    (folder / "args.yaml").unlink()
    with pytest.raises(CheckpointError, match="lacks args.yaml"):
        import_t2l(folder, tiny_config_dir)
    folder = write_t2l_folder(tmp_path / "t2l2", src, to_t2l_state(src))
    (folder / "hypermod.pt").unlink()
    with pytest.raises(CheckpointError, match="lacks hypermod.pt"):
        import_t2l(folder, tiny_config_dir)


def test_import_t2l_nonfinite(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes)
    state = to_t2l_state(src)
    state["mlp3.4.weight"][0, 0] = float("nan")
    folder = write_t2l_folder(tmp_path / "t2l", src, state)
    with pytest.raises(CheckpointError, match="NaN"):
        import_t2l(folder, tiny_config_dir)


class SneakyDict(collections.OrderedDict):
    """Not a class torch's weights_only unpickler allows: loading it must be refused."""


def test_import_t2l_refuses_pickled_objects(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes)
    folder = write_t2l_folder(tmp_path / "t2l", src, SneakyDict(to_t2l_state(src)))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        import_t2l(folder, tiny_config_dir)


def test_import_t2l_refuses_non_dict(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes)
    folder = write_t2l_folder(tmp_path / "t2l", src, [torch.zeros(2)])
    with pytest.raises(CheckpointError, match="not a state dict"):
        import_t2l(folder, tiny_config_dir)


def test_import_t2l_corrupt_archive(tmp_path, tiny_config_dir, tiny_shapes):
    src = make_hypernet("t2l-L", tiny_shapes)
    folder = write_t2l_folder(tmp_path / "t2l", src, to_t2l_state(src))
    data = (folder / "hypermod.pt").read_bytes()
    (folder / "hypermod.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        import_t2l(folder, tiny_config_dir)
