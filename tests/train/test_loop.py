"""The training loop: starting from a checkpoint (recon on the tiny shapes, the cheapest mode), and the align
path end to end on the real base model from cached teacher rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import rand_lora
from safetensors.torch import load_file

from vllm_t2l.checkpoint import CheckpointError, load
from vllm_t2l.models import prepare_default_model
from vllm_t2l.train import dials, objectives, teacher
from vllm_t2l.train.data import load_dials, load_queries
from vllm_t2l.train.loop import TrainConfig, train


@pytest.fixture
def recon_config(tmp_path: Path, tiny_config_dir: Path):
    """A recon run over two random rank-8 adapters; keyword arguments override the config."""
    library = tmp_path / "library"
    for i, text in enumerate(["Answer like a pirate.", "Answer formally."]):
        (rand_lora(i, rank=8).save_peft(library / f"a{i}", "tiny-llama") / "description.txt").write_text(text)

    def make(out: str, **kw) -> TrainConfig:
        return TrainConfig(**{"mode": "recon", "out": str(tmp_path / out), "base_model": str(tiny_config_dir),
                              "adapters": str(library), "steps": 2, "save_every": 1, "latent": 32,
                              "head_in": 48, **kw})
    return make


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "hypernet.safetensors")


def test_init_starts_from_the_checkpoint_and_training_moves_on(recon_config):
    first = train(recon_config("first"))
    start = weights(first)
    assert not weights(train(recon_config("untrained", steps=0)))["heads.q_proj.bias"].equal(
        start["heads.q_proj.bias"])
    copied = weights(train(recon_config("copy", steps=0, init=str(first))))
    assert copied.keys() == start.keys() and all(copied[k].equal(start[k]) for k in start)
    tuned = weights(train(recon_config("tuned", steps=2, init=str(first))))
    assert not tuned["heads.q_proj.weight"].equal(start["heads.q_proj.weight"])


def test_init_refuses_a_different_network(recon_config):
    first = train(recon_config("first"))
    with pytest.raises(CheckpointError, match="differs from the network being trained"):
        train(recon_config("other", rank=4, init=str(first)))
    with pytest.raises(ValueError, match="needs a hypernetwork"):
        train(recon_config("lora", arch="lora", init=str(first)))


@pytest.fixture
def align_config(tmp_path: Path, student):
    """Align runs over three dial samples cached in place (no vLLM teacher in these tests); keyword arguments
    override the config."""
    query = "What is the capital of France?"
    answer = student.tokenizer("The capital of France is Paris. It is a lovely city.", add_special_tokens=False)
    poles = {p["style"]: p for p in load_dials()}
    triples = [(poles[s], poles[s]["descriptions"][0], {"text": query}) for s in ("long", "short", "pirate")]
    made = dials.samples(student, triples, {query: answer["input_ids"] + [student.tokenizer.eos_token_id]}, seed=0)

    def make(name: str, **kw) -> TrainConfig:
        out = tmp_path / name
        out.mkdir()
        teacher.save(made[:1], out / "teacher-train.pt")
        teacher.save(made[1:], out / "dials.pt")
        return TrainConfig(**{"out": str(out), "base_model": str(prepare_default_model()), "dials": 1, "steps": 2,
                              "batch_size": 3, "latent": 32, "head_in": 48, **kw})
    return make


def test_align_trains_on_dial_samples_and_weights_what_a_rule_wrote(align_config):
    runs = {"one": {}, "fifty": {"ruled_weight": 50.0},
            "fifty-by-pole": {"pole_weights": ("dial-short=50", "dial-pirate=50")}}
    trained = {name: weights(train(align_config(name, **kw))) for name, kw in runs.items()}
    one, fifty = trained["one"]["heads.q_proj.weight"], trained["fifty"]["heads.q_proj.weight"]
    assert all(t.isfinite().all() for t in trained["one"].values())
    assert not one.equal(fifty)
    assert trained["fifty-by-pole"]["heads.q_proj.weight"].equal(fifty)  # both dial poles overridden = global 50


def test_the_anchor_holds_other_texts_adapters_near_the_init(align_config, minilm):
    start = train(align_config("start", lr=0.05))
    runs = {name: load(train(align_config(name, steps=4, lr=0.05, init=str(start), **kw))).hypernet
            for name, kw in {"free": {}, "held": {"anchor_weight": 100.0}}.items()}
    emb = minilm([q["text"] for q in load_queries() if q["split"] == "train"][:16])
    with torch.no_grad():
        kept = load(start).hypernet(emb)
        drift = {name: objectives.adapter_drift(net(emb), kept).mean().item() for name, net in runs.items()}
    assert 0 < drift["held"] < drift["free"] / 2, drift


def test_the_anchor_needs_an_init(tmp_path):
    with pytest.raises(ValueError, match="needs --init"):
        train(TrainConfig(out=str(tmp_path / "run"), anchor_weight=1.0))


def test_a_bad_pole_weight_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="'dial-shortt=3'"):
        train(TrainConfig(out=str(tmp_path / "run"), dials=1, pole_weights=("dial-shortt=3",)))
    assert not (tmp_path / "run").exists()


def test_guided_rows_train_at_their_strength_against_the_guided_teacher(align_config):
    plain = weights(train(align_config("plain")))["heads.q_proj.weight"]
    at_one = weights(train(align_config("at-one", guided_share=1.0, guidance=1.0)))["heads.q_proj.weight"]
    guided = weights(train(align_config("guided", guided_share=1.0, guidance=2.0)))["heads.q_proj.weight"]
    torch.testing.assert_close(at_one, plain)  # g = 1 is the plain teacher at strength 1
    assert guided.isfinite().all() and not torch.allclose(guided, plain)


def test_guidance_needs_align_and_a_share_in_range(tmp_path):
    with pytest.raises(ValueError, match="--guided-share"):
        train(TrainConfig(out=str(tmp_path / "run"), guided_share=1.5))
    with pytest.raises(ValueError, match="--guided-share"):
        train(TrainConfig(out=str(tmp_path / "run"), mode="sft", guided_share=0.5))


def test_follow_trains_only_the_follow_network_and_keeps_strength_one(align_config):
    start = train(align_config("start", lr=0.05))
    run = train(align_config("follow", lr=0.05, init=str(start), follow="new", guided_share=1.0,
                             anchor_weight=1.0))
    before, after = weights(start), weights(run)
    assert load(run).config.follow and load(run).recommended_strength == 2.0 == load(start).recommended_strength * 2
    assert all(after[k].equal(v) for k, v in before.items())  # the first network is --init's, bit for bit
    assert not after["follow.heads.q_proj.weight"].equal(torch.zeros_like(after["follow.heads.q_proj.weight"]))
    assert not after["follow.shared_B.q_proj"].equal(torch.zeros_like(after["follow.shared_B.q_proj"]))
    again = train(align_config("from-follow", steps=0, init=str(start), follow=str(start), guided_share=1.0))
    assert all(weights(again)[f"follow.{k}"].equal(v) for k, v in before.items())


def test_follow_needs_an_init_and_guided_rows(tmp_path):
    for kw in ({"follow": "new", "guided_share": 1.0}, {"follow": "new", "init": "x"},
               {"follow": "new", "init": "x", "guided_share": 1.0, "arch": "zhyper-square"}):
        with pytest.raises(ValueError, match="--follow"):
            train(TrainConfig(out=str(tmp_path / "run"), **kw))
