"""Tests for vllm_t2l.t2l_folder: folders written by the upstream Text-to-LoRA code import exactly.

The folders and upstream's own generated adapters live in ../shared/fixtures/t2l-upstream (see its
README); they are read in place, never copied into the repository.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vllm_t2l import checkpoint as ckpt_mod
from vllm_t2l.checkpoint import CheckpointError
from vllm_t2l.embed import scale
from vllm_t2l.t2l_folder import import_t2l

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "t2l-upstream"
FOLDERS = ["L", "M", "L_offset", "L_all7", "L_recon", "M_all7_offset"]
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"upstream fixtures not found at {FIXTURES}")
BASE = FIXTURES / "tiny-llama"


def reference(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    folder = FIXTURES / name / "reference"
    emb = load_file(folder / "task_emb.safetensors")["task_emb"]
    return emb, load_file(folder / "lora.safetensors"), json.loads((folder / "meta.json").read_text())


def worst_errors(net, emb: torch.Tensor, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest relative error per module over every row, layer and factor (A, B) of the reference."""
    with torch.no_grad():
        out = net(emb)
    worst: dict[str, float] = {}
    for key, want in ref.items():
        row, _, layer, module, factor = key.split(".")
        got = out[module][0 if factor == "lora_A" else 1][int(row[3:]), int(layer)]
        assert got.shape == want.shape, key
        err = ((got - want).norm() / want.norm()).item()
        worst[module] = max(worst.get(module, 0.0), err)
    return worst


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name, ignore=shutil.ignore_patterns("reference")))


def edit_args(folder: Path, **changes) -> Path:
    args = yaml.safe_load((folder / "args.yaml").read_text())
    (folder / "args.yaml").write_text(yaml.safe_dump({**args, **changes}))
    return folder


def refusal(folder: Path, match: str, **kw) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        import_t2l(folder, BASE, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- exact import ------------------------------------------------------------------------------

@needs_fixtures
@pytest.mark.parametrize("name", FOLDERS)
def test_fixture_reproduces_upstream_lora(name, tmp_path):
    emb, ref, meta = reference(name)
    ck = import_t2l(FIXTURES / name, BASE)
    assert ck.config.arch == ("t2l-M" if meta["shared_AB_head"] else "t2l-L")
    assert ck.config.rank == meta["rank"] and ck.config.alpha == meta["lora_alpha"]
    assert ck.config.use_rslora is meta["use_rslora"]
    assert ck.config.scaling == pytest.approx(meta["peft_scaling"])
    assert ck.config.head_bias is meta["head_has_bias"]
    assert ck.base.modules == {m: tuple(s) for m, s in meta["module_shapes_in_out"].items()}
    assert ck.base.n_layers == meta["n_layers"]
    # the training order, which adapter_config.json and args.yaml do not always give
    assert list(ck.config.target_modules) == sorted(meta["module_to_int"], key=meta["module_to_int"].get)
    # through our own format and back: what `serve --checkpoint` loads
    back = ckpt_mod.load(ck.save(tmp_path / "ckpt")).hypernet
    errors = worst_errors(back, emb, ref)
    assert set(errors) == set(meta["module_to_int"])
    assert max(errors.values()) <= 1e-5, errors


@needs_fixtures
def test_adapter_config_order_would_be_wrong():
    """L_all7's adapter_config.json swaps gate_proj and k_proj: honouring it misses far, the heads' order does not."""
    emb, ref, meta = reference("L_all7")
    listed = json.loads((FIXTURES / "L_all7" / "adapter_config.json").read_text())["target_modules"]
    assert listed != list(meta["module_to_int"])
    wrong = import_t2l(FIXTURES / "L_all7", BASE, module_order=listed)
    assert wrong.card["module_order_source"] == "--module-order"
    assert max(worst_errors(wrong.hypernet, emb, ref).values()) > 0.2
    given = import_t2l(FIXTURES / "L_all7", BASE, module_order=list(meta["module_to_int"]))
    assert max(worst_errors(given.hypernet, emb, ref).values()) <= 1e-5


@needs_fixtures
def test_offsets_and_z_scores_matter():
    """The per-layer offsets and the recon targets are used: zeroing them breaks the match."""
    recon = ("mean_recon_target.", "std_recon_target.")
    for name, prefixes in [("M_all7_offset", ("AB_offset.",)), ("L_recon", recon)]:
        emb, ref, _ = reference(name)
        net = import_t2l(FIXTURES / name, BASE).hypernet
        with torch.no_grad():
            for key, buf in net.named_buffers():
                if key.startswith(prefixes):
                    buf.fill_(1.0 if key.startswith("std") else 0.0)
        assert max(worst_errors(net, emb, ref).values()) > 0.2, name


@needs_fixtures
def test_recon_without_z_scores_divides_by_sqrt_delta_w_scaling(tmp_path):
    """Upstream's third recon case (no fixture has it): A, B = head output / sqrt(delta_w_scaling).
    The head's raw output is recovered from L_recon's reference by undoing its z-scoring."""
    emb, ref, _ = reference("L_recon")
    state = torch.load(FIXTURES / "L_recon" / "hypermod.pt", weights_only=True)
    folder = edit_args(copy_fixture("L_recon", tmp_path), pred_z_score=False, factorized=False, delta_w_scaling=400)
    net = import_t2l(folder, BASE).hypernet
    assert not net.config.z_score
    raw = {}
    for key, value in ref.items():
        _, _, layer, module, factor = key.split(".")
        ab = factor[-1]
        mean = state[f"mean_recon_target.{ab}.{module}"][int(layer)]
        std = state[f"std_recon_target.{ab}.{module}"][int(layer)]
        raw[key] = (value - mean) / (std + 1e-10) / math.sqrt(400)
    assert max(worst_errors(net, emb, raw).values()) <= 1e-5


def test_embedding_convention_matches_the_fixtures():
    """The reference rows are what upstream's embedding step returns: L2-normalised times sqrt(d), as ``scale``."""
    if not FIXTURES.is_dir():
        pytest.skip(f"upstream fixtures not found at {FIXTURES}")
    emb, _, meta = reference("L")
    assert emb.shape[1] == meta["emb_dim"]
    torch.testing.assert_close(emb.norm(dim=1), torch.full((emb.shape[0],), math.sqrt(emb.shape[1])))
    torch.testing.assert_close(scale(emb, True), emb)
    torch.testing.assert_close(scale(emb / 7.0, True), emb)


@needs_fixtures
def test_embedder_preprocessing_is_recorded(tmp_path):
    ck = import_t2l(FIXTURES / "L", BASE, embedder_path="/models/gte-large-en-v1.5")
    e = ck.embedder
    assert (e.name, e.dim, e.pooling, e.backend) == ("/models/gte-large-en-v1.5", 1024, "cls", "transformers")
    assert e.add_full_stop and e.scale_sqrt_dim and e.max_tokens == 8192 and e.dtype == "float32"
    assert ckpt_mod.load(ck.save(tmp_path / "c")).embedder == e
    assert import_t2l(FIXTURES / "L", BASE).embedder.name == "Alibaba-NLP/gte-large-en-v1.5"
    sfr = edit_args(copy_fixture("L", tmp_path), emb_model="Salesforce/SFR-Embedding-2_R")
    assert (import_t2l(sfr, BASE).embedder.pooling, import_t2l(sfr, BASE).embedder.dtype) == ("last", "bfloat16")


# ---- refusals: one line each -------------------------------------------------------------------

@needs_fixtures
@pytest.mark.parametrize("changes, match", [
    ({"autoreg_gen": True}, "S checkpoints"),
    ({"training_task": "recon", "pred_z_score": True, "factorized": False}, "NotImplementedError"),
    ({"training_task": "recon", "pred_z_score": False, "factorized": True}, "not supported"),
    ({"encoder_type": "discrete"}, "task encoder"),
    ({"use_one_hot_task_emb": True}, "one-hot"),
    ({"training_task": "dpo"}, "training_task"),
    ({"emb_model": ""}, "emb_model"),
    ({"hypernet_latent_size": 32}, "shape mismatch"),
])
def test_unsupported_settings_are_refused(changes, match, tmp_path):
    refusal(edit_args(copy_fixture("L", tmp_path), **changes), match)


@needs_fixtures
def test_module_order_must_be_the_folders_modules(tmp_path):
    refusal(FIXTURES / "L", "not an order", module_order=["q_proj", "k_proj"])
    folder = copy_fixture("L", tmp_path)
    lora = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(lora, target_modules=["q_proj", "o_proj"])))
    refusal(folder, "heads for")
    (folder / "adapter_config.json").write_text(json.dumps(dict(lora, target_modules="q_proj|v_proj")))
    refusal(folder, "must be a list")


@needs_fixtures
def test_disagreeing_m_key_orders_are_refused(tmp_path):
    folder = copy_fixture("M", tmp_path)
    state = torch.load(folder / "hypermod.pt", weights_only=True)
    emb = {k: v for k, v in state.items() if k.startswith("out_emb.")}
    rest = {k: v for k, v in state.items() if not k.startswith("out_emb.")}
    torch.save({**rest, **dict(reversed(list(emb.items())))}, folder / "hypermod.pt")
    refusal(folder, "disagree")
    assert import_t2l(folder, BASE, module_order=["v_proj", "q_proj"]).config.target_modules == ("v_proj", "q_proj")


@needs_fixtures
def test_mixed_head_biases_are_refused(tmp_path):
    folder = copy_fixture("L", tmp_path)
    state = torch.load(folder / "hypermod.pt", weights_only=True)
    del state["heads.q_proj.bias"]
    torch.save(state, folder / "hypermod.pt")
    refusal(folder, "have a bias")


@needs_fixtures
def test_wrong_base_is_refused(tmp_path):
    config = json.loads((BASE / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(config, hidden_size=128)))
    with pytest.raises(CheckpointError, match="heads.v_proj") as e:
        import_t2l(FIXTURES / "L", other)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        import_t2l(FIXTURES / "L", tmp_path / "missing")


class SneakyDict(collections.OrderedDict):
    """Not a class torch's weights_only unpickler allows: loading it must be refused."""


@needs_fixtures
@pytest.mark.parametrize("damage, match", [
    (lambda f: (f / "args.yaml").unlink(), "lacks args.yaml"),
    (lambda f: (f / "hypermod.pt").unlink(), "lacks hypermod.pt"),
    (lambda f: (f / "adapter_config.json").write_text("{ nope"), "cannot be read safely"),
    (lambda f: (f / "hypermod.pt").write_bytes((f / "hypermod.pt").read_bytes()[:1000]), "cannot be read safely"),
    (lambda f: torch.save([torch.zeros(2)], f / "hypermod.pt"), "not a state dict"),
    (lambda f: torch.save(SneakyDict(a=torch.zeros(1)), f / "hypermod.pt"), "cannot be read safely"),
])
def test_broken_folders_are_refused(damage, match, tmp_path):
    folder = copy_fixture("L", tmp_path)
    damage(folder)
    refusal(folder, match)


@needs_fixtures
def test_nonfinite_weights_are_refused(tmp_path):
    folder = copy_fixture("L", tmp_path)
    state = torch.load(folder / "hypermod.pt", weights_only=True)
    state["mlp3.4.weight"][0, 0] = float("nan")
    torch.save(state, folder / "hypermod.pt")
    refusal(folder, r"NaN or infinite values in \['to_head.4.weight'\]")


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        import_t2l(tmp_path / "nope", tmp_path)
