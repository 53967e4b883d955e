"""Tests for vllm_t2l.lora: PEFT folders, scaling, exact mixing, and loading into real peft."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_CONFIG, rand_lora

from vllm_t2l.lora import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, LoRAWeights, from_batch

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- basics ------------------------------------------------------------------------------------

def test_properties():
    lora = rand_lora(0, rank=4, alpha=8.0)
    assert lora.rank == 4 and lora.n_layers == 3
    assert lora.nbytes() == 4 * sum(t.numel() for t in (*lora.A.values(), *lora.B.values()))


@pytest.mark.parametrize("use_rslora,expect", [(True, 8.0 / 2.0), (False, 8.0 / 4.0)])
def test_scaling(use_rslora, expect):
    lora = rand_lora(0, rank=4, alpha=8.0, use_rslora=use_rslora)
    assert lora.scaling == pytest.approx(expect)
    d = lora.delta("q_proj", 1)
    assert d.dtype == torch.float64 and d.shape == (64, 64)
    ref = expect * lora.B["q_proj"][1].double() @ lora.A["q_proj"][1].double()
    torch.testing.assert_close(d, ref)


def test_norm_is_the_frobenius_norm_of_every_update_together():
    a, b = rand_lora(1, rank=4), rand_lora(2, rank=2, use_rslora=False)
    dense = torch.cat([a.delta(m, i).flatten() for m in a.A for i in range(a.n_layers)])
    assert a.norm() == pytest.approx(torch.linalg.vector_norm(dense).item(), rel=1e-9)
    assert LoRAWeights.weighted_sum([a, a], [1.0, -1.0]).norm() == pytest.approx(0.0, abs=1e-6)
    assert LoRAWeights.weighted_sum([a, b], [2.0, 0.0]).norm() == pytest.approx(2 * a.norm(), rel=1e-6)


def test_state_dict_keys():
    lora = rand_lora(0, modules=("q_proj", "v_proj", "gate_proj", "down_proj"))
    sd = lora.state_dict()
    expect = set()
    for i in range(3):
        for m, parent in [("q_proj", "self_attn"), ("v_proj", "self_attn"),
                          ("gate_proj", "mlp"), ("down_proj", "mlp")]:
            for ab in ("lora_A", "lora_B"):
                expect.add(f"base_model.model.model.layers.{i}.{parent}.{m}.{ab}.weight")
    assert set(sd) == expect
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    torch.testing.assert_close(sd["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"],
                               lora.B["down_proj"][2], rtol=0, atol=0)
    assert sd["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (4, 64)
    assert sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)


@pytest.mark.parametrize("use_rslora", [True, False])
def test_save_load_round_trip(tmp_path, use_rslora):
    lora = rand_lora(3, rank=5, alpha=12.5, use_rslora=use_rslora,
                     modules=("q_proj", "v_proj", "gate_proj", "down_proj"))
    folder = lora.save_peft(tmp_path / "a", base_model="tiny-llama")
    assert (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()
    back = LoRAWeights.load_peft(folder)
    assert back.rank == 5 and back.n_layers == 3
    assert back.alpha == 12.5 and back.use_rslora is use_rslora
    assert set(back.A) == set(lora.A) and set(back.B) == set(lora.B)
    for m in lora.A:
        torch.testing.assert_close(back.A[m], lora.A[m], rtol=0, atol=0)
        torch.testing.assert_close(back.B[m], lora.B[m], rtol=0, atol=0)
        for i in range(3):
            torch.testing.assert_close(back.delta(m, i), lora.delta(m, i))


def test_save_peft_casts_to_fp32(tmp_path):
    lora = rand_lora(1)
    half = LoRAWeights({m: a.bfloat16() for m, a in lora.A.items()},
                       {m: b.bfloat16() for m, b in lora.B.items()}, lora.alpha, lora.use_rslora)
    back = LoRAWeights.load_peft(half.save_peft(tmp_path / "h", "tiny-llama"))
    assert all(a.dtype == torch.float32 for a in back.A.values())


def test_adapter_config_fields(tmp_path):
    lora = rand_lora(0, rank=4, alpha=8.0, use_rslora=True, modules=("v_proj", "q_proj"))
    folder = lora.save_peft(tmp_path / "a", "tiny-llama", metadata={"checkpoint": "abc", "mode": "emb"})
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    assert cfg["r"] == 4
    assert cfg["lora_alpha"] == 8.0
    assert cfg["use_rslora"] is True
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["lora_dropout"] == 0.0 and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] is False
    assert "vllm_t2l" not in cfg  # peft warns about unknown keys; metadata lives in a sidecar
    assert json.loads((folder / METADATA_FILE).read_text()) == {"checkpoint": "abc", "mode": "emb"}
    assert not (rand_lora(0).save_peft(tmp_path / "b", "m") / METADATA_FILE).exists()


def test_from_batch_slices():
    g = torch.Generator().manual_seed(0)
    batch = {"q_proj": (torch.randn(2, 3, 4, 64, generator=g), torch.randn(2, 3, 64, 4, generator=g))}
    lora = from_batch(batch, 1, alpha=4.0, use_rslora=False)
    assert torch.equal(lora.A["q_proj"], batch["q_proj"][0][1])
    assert torch.equal(lora.B["q_proj"], batch["q_proj"][1][1])
    assert lora.scaling == 1.0


# ---- exact mixing ------------------------------------------------------------------------------

def _check_weighted(parts, weights):
    mix = LoRAWeights.weighted_sum(parts, weights)
    assert mix.rank == sum(p.rank for p in parts)
    assert mix.scaling == pytest.approx(1.0)
    for m in parts[0].A:
        for i in range(parts[0].n_layers):
            expect = sum(w * p.delta(m, i) for p, w in zip(parts, weights))
            torch.testing.assert_close(mix.delta(m, i), expect, rtol=1e-5, atol=1e-5)
    return mix


@pytest.mark.parametrize("weights", [(0.7, 0.3), (-1.0, 2.5), (1.5, -0.25)])
def test_weighted_sum_two(weights):
    _check_weighted([rand_lora(1, rank=4, use_rslora=True), rand_lora(2, rank=4, use_rslora=False)], weights)


@pytest.mark.parametrize("weights", [(0.2, 0.3, 0.5), (-0.5, 1.7, 0.9), (2.0, -2.0, 1.0)])
def test_weighted_sum_three(weights):
    parts = [rand_lora(1, rank=2, alpha=4.0), rand_lora(2, rank=4, alpha=32.0, use_rslora=False),
             rand_lora(3, rank=3, alpha=1.0)]
    mix = _check_weighted(parts, weights)
    assert mix.rank == 9


def test_weighted_sum_one_zero_is_first():
    a, b = rand_lora(1), rand_lora(2)
    mix = LoRAWeights.weighted_sum([a, b], [1.0, 0.0])
    for m in a.A:
        for i in range(a.n_layers):
            torch.testing.assert_close(mix.delta(m, i), a.delta(m, i), rtol=1e-6, atol=1e-6)


def test_weighted_sum_saves_and_reloads(tmp_path):
    a, b = rand_lora(1), rand_lora(2)
    mix = LoRAWeights.weighted_sum([a, b], [0.6, 0.4])
    back = LoRAWeights.load_peft(mix.save_peft(tmp_path / "mix", "tiny-llama"))
    assert back.rank == 8 and back.use_rslora is False and back.alpha == 8.0
    for m in a.A:
        torch.testing.assert_close(back.delta(m, 0), 0.6 * a.delta(m, 0) + 0.4 * b.delta(m, 0),
                                   rtol=1e-5, atol=1e-5)


def test_weighted_sum_errors():
    a = rand_lora(1)
    with pytest.raises(ValueError, match="one weight per adapter"):
        LoRAWeights.weighted_sum([a, rand_lora(2)], [1.0])
    with pytest.raises(ValueError, match="one weight per adapter"):
        LoRAWeights.weighted_sum([a], [0.5, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        LoRAWeights.weighted_sum([], [])
    with pytest.raises(ValueError, match="different modules"):
        LoRAWeights.weighted_sum([a, rand_lora(2, modules=("q_proj", "gate_proj"))], [0.5, 0.5])
    with pytest.raises(ValueError, match="different modules"):
        LoRAWeights.weighted_sum([a, rand_lora(2, modules=("q_proj",))], [0.5, 0.5])


# ---- real peft ---------------------------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [True, False])
def test_peft_loads_saved_folder(tmp_path, use_rslora):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    lora = rand_lora(7, rank=4, alpha=6.0, use_rslora=use_rslora)
    lora.A = {m: a * 0.1 for m, a in lora.A.items()}
    folder = lora.save_peft(tmp_path / "adapter", "tiny-llama")

    ids = torch.tensor([[1, 5, 9, 17, 33, 64, 100]])
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        peft_logits = model(ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4), "the adapter changed nothing"

    merged = model.merge_and_unload()
    sd = merged.state_dict()
    for m in ("q_proj", "v_proj"):
        for i in range(3):
            key = f"model.layers.{i}.self_attn.{m}.weight"
            got = (sd[key].double() - original[key].double())
            torch.testing.assert_close(got, lora.delta(m, i), rtol=1e-4, atol=1e-5)
    # untouched modules stay untouched
    key = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(sd[key], original[key])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_logits, rtol=1e-4, atol=1e-4)


def test_peft_loads_weighted_sum(tmp_path):
    """A concatenated-rank mix (alpha = r, no rsLoRA) means the same to peft as to us."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).eval()
    original = base.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    mix = LoRAWeights.weighted_sum([rand_lora(1, rank=2), rand_lora(2, rank=2, use_rslora=False)],
                                   [0.05, -0.03])
    folder = mix.save_peft(tmp_path / "mix", "tiny-llama")
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    got = merged.state_dict()["model.layers.0.self_attn.q_proj.weight"].double() - original.double()
    torch.testing.assert_close(got, mix.delta("q_proj", 0), rtol=1e-4, atol=1e-5)
    assert math.isclose(mix.scaling, 1.0)
