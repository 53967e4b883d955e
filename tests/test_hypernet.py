"""Tests for vllm_t2l.hypernet: base shapes, configs, and the five hypernetwork variants."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_CONFIG, make_hypernet

from vllm_t2l.hypernet import ARCHS, BaseShapes, FoldedCodes, HyperConfig, HyperNet, sinusoid
from vllm_t2l.lora import from_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMB = 384


def _emb(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, EMB, generator=g) * 3


# ---- BaseShapes --------------------------------------------------------------------------------

def test_from_config_llama_gqa():
    s = BaseShapes.from_config(TINY_CONFIG, ALL_MODULES)
    # hidden 64, 4 heads -> head_dim 16; 2 kv heads -> kv width 32; intermediate 96
    assert s.modules == {
        "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64),
    }
    assert s.n_layers == 3
    assert s.name == "tiny-llama"
    assert list(s.modules) == list(ALL_MODULES)


def test_from_config_only_requested_modules_in_order():
    s = BaseShapes.from_config(TINY_CONFIG, ("v_proj", "q_proj"))
    assert list(s.modules) == ["v_proj", "q_proj"]


def test_from_config_no_kv_heads_means_mha():
    cfg = {k: v for k, v in TINY_CONFIG.items() if k != "num_key_value_heads"}
    s = BaseShapes.from_config(cfg, ("k_proj", "v_proj"))
    assert s.modules == {"k_proj": (64, 64), "v_proj": (64, 64)}


def test_from_config_explicit_head_dim():
    cfg = dict(TINY_CONFIG, head_dim=32)  # 4 * 32 = 128 != hidden (as in Gemma / Qwen3)
    s = BaseShapes.from_config(cfg, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert s.modules == {"q_proj": (64, 128), "k_proj": (64, 64), "v_proj": (64, 64),
                         "o_proj": (128, 64)}


def test_from_config_text_config_nesting():
    outer = {"architectures": ["SomeVLM"], "model_type": "vlm", "text_config": dict(TINY_CONFIG),
             "vision_config": {"hidden_size": 999}}
    assert (BaseShapes.from_config(outer, ALL_MODULES).modules
            == BaseShapes.from_config(TINY_CONFIG, ALL_MODULES).modules)


def test_from_config_path_dir_and_file(tiny_config_dir):
    a = BaseShapes.from_config(tiny_config_dir, ("q_proj",))
    b = BaseShapes.from_config(tiny_config_dir / "config.json", ("q_proj",))
    c = BaseShapes.from_config(str(tiny_config_dir), ("q_proj",), name="given")
    assert a == b
    assert a.modules == c.modules and c.name == "given"


def test_from_config_unsupported_module():
    with pytest.raises(ValueError, match="lm_head"):
        BaseShapes.from_config(TINY_CONFIG, ("q_proj", "lm_head"))


def test_shapes_dict_round_trip():
    s = BaseShapes.from_config(TINY_CONFIG, ALL_MODULES)
    d = json.loads(json.dumps(s.to_dict()))
    assert BaseShapes.from_dict(d) == s


def test_differences():
    a = BaseShapes.from_config(TINY_CONFIG, ("q_proj", "v_proj"))
    assert a.differences(a) == []
    assert a.differences(BaseShapes.from_config(dict(TINY_CONFIG), ("q_proj", "v_proj"), name="x")) == []
    b = BaseShapes.from_config(dict(TINY_CONFIG, num_hidden_layers=5, num_key_value_heads=4),
                               ("q_proj", "v_proj"))
    diff = a.differences(b)
    assert len(diff) == 2
    assert any("layers" in d and "3" in d and "5" in d for d in diff)
    assert any(d.startswith("v_proj") and "(64, 32)" in d and "(64, 64)" in d for d in diff)
    assert not any(d.startswith("q_proj") for d in diff)
    c = BaseShapes.from_config(TINY_CONFIG, ("q_proj",))
    only = a.differences(c)
    assert len(only) == 1 and only[0].startswith("v_proj") and "None" in only[0]


# ---- HyperConfig -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{"arch": "t2l-XL"}, {"latent": 30}, {"rank": 0},
                                {"arch": "zhyper-square", "follow": True}, {"arch": "t2l-L", "follow": True}])
def test_hyperconfig_validation(kw):
    with pytest.raises(ValueError):
        HyperConfig(**kw)


def test_hyperconfig_scaling_and_dict():
    assert HyperConfig(rank=4, alpha=8, use_rslora=True).scaling == pytest.approx(4.0)
    assert HyperConfig(rank=4, alpha=8, use_rslora=False).scaling == pytest.approx(2.0)
    c = HyperConfig(arch="t2l-S", target_modules=["q_proj"], rank=2)
    assert c.target_modules == ("q_proj",)
    d = json.loads(json.dumps(c.to_dict()))
    assert HyperConfig(**d) == c


def test_hypernet_refuses_missing_module(tiny_shapes):
    with pytest.raises(ValueError, match="o_proj"):
        HyperNet(HyperConfig(target_modules=("q_proj", "o_proj"), latent=32, head_in=48), tiny_shapes)


def test_sinusoid_rows_distinct():
    s = sinusoid(8, 32)
    assert s.shape == (8, 32)
    assert torch.cdist(s, s).add(torch.eye(8)).min() > 1e-3


# ---- every variant -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def all_shapes() -> BaseShapes:
    return BaseShapes.from_config(TINY_CONFIG, ALL_MODULES)


def _net(arch: str, shapes: BaseShapes, randomize: bool = True, seed: int = 0) -> HyperNet:
    torch.manual_seed(seed)
    net = HyperNet(HyperConfig(arch=arch, emb_dim=EMB, latent=32, head_in=48,
                               target_modules=tuple(shapes.modules)), shapes)
    if randomize:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes(arch, all_shapes):
    net = _net(arch, all_shapes)
    with torch.no_grad():
        out = net(_emb(3))
    assert list(out) == list(ALL_MODULES)
    r, L = net.config.rank, all_shapes.n_layers
    for m, (d_in, d_out) in all_shapes.modules.items():
        A, B = out[m]
        assert A.shape == (3, L, r, d_in), m
        assert B.shape == (3, L, d_out, r), m
        assert A.dtype == B.dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_init_is_noop_lora(arch, all_shapes):
    net = _net(arch, all_shapes, randomize=False).eval()
    with torch.no_grad():
        out = net(_emb(2))
    for m, (A, B) in out.items():
        dW = B @ A
        assert torch.count_nonzero(dW) == 0, m
        assert A.abs().sum() > 0, f"{m}: A is all zeros at init"
        # every row of A is random: a rank-r init, not a degenerate one
        assert torch.linalg.matrix_rank(A[0, 0]) == net.config.rank, m


@pytest.mark.parametrize("arch", ARCHS)
def test_different_embeddings_give_different_outputs(arch, hypernet_factory):
    net = hypernet_factory(arch)
    with torch.no_grad():
        out = net(_emb(2))
    for m, (A, B) in out.items():
        d0 = B[0] @ A[0]
        d1 = B[1] @ A[1]
        assert not torch.allclose(d0, d1, atol=1e-6), m
        assert d0.abs().max() > 1e-4, f"{m}: randomized net still emits a no-op"


@pytest.mark.parametrize("arch", ARCHS)
def test_batching_invariance(arch, all_shapes):
    net = _net(arch, all_shapes)
    x = _emb(4)
    with torch.no_grad():
        batch = net(x)
        singles = [net(x[i:i + 1]) for i in range(4)]
    for m, (A, B) in batch.items():
        for i, single in enumerate(singles):
            torch.testing.assert_close(A[i], single[m][0][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(B[i], single[m][1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("zhyper")])
def test_zhyper_codes_round_trip(arch, hypernet_factory, tiny_shapes):
    net = hypernet_factory(arch)
    x = _emb(3)
    with torch.no_grad():
        codes = net.codes(x)
        via_codes = net.from_codes(codes)
        direct = net(x)
    r = net.config.rank
    for m, z in codes.items():
        expect = (3, tiny_shapes.n_layers, r) if arch == "zhyper-diag" else (3, tiny_shapes.n_layers, r, r)
        assert z.shape == expect
        torch.testing.assert_close(via_codes[m][0], direct[m][0], rtol=0, atol=0)
        torch.testing.assert_close(via_codes[m][1], direct[m][1], rtol=0, atol=0)


@pytest.mark.parametrize("arch", [*(a for a in ARCHS if a.startswith("zhyper")), "follow"])
def test_folded_codes_equal_codes(arch, hypernet_factory):
    net = (hypernet_factory("zhyper-diag", seed=3, follow=True) if arch == "follow"
           else hypernet_factory(arch, seed=3))
    x = _emb(5, seed=2)
    with torch.no_grad():
        want = net.codes(x)
    got = FoldedCodes(net)(x)
    assert list(got) == list(want)
    for m in want:
        assert got[m].shape == want[m].shape
        assert (want[m][0] - want[m][1]).abs().max() > 1e-3  # input-dependent, so a dropped task term would show
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["t2l-L", "t2l-M", "t2l-S"])
def test_codes_refused_for_t2l(arch, hypernet_factory):
    with pytest.raises(ValueError, match="codes"):
        hypernet_factory(arch).codes(_emb(1))
    with pytest.raises(ValueError, match="codes"):
        FoldedCodes(hypernet_factory(arch))


@pytest.mark.parametrize("arch", ["zhyper-diag", "zhyper-square"])
@pytest.mark.parametrize("a,b", [(0.7, 0.3), (-1.5, 2.0)])
def test_zhyper_linearity(arch, a, b, hypernet_factory):
    net = hypernet_factory(arch)
    c = net.config
    with torch.no_grad():
        codes = net.codes(_emb(2))
        z1 = {m: z[0:1] for m, z in codes.items()}
        z2 = {m: z[1:2] for m, z in codes.items()}
        mix = {m: a * z1[m] + b * z2[m] for m in codes}
        l1 = from_batch(net.from_codes(z1), 0, c.alpha, c.use_rslora)
        l2 = from_batch(net.from_codes(z2), 0, c.alpha, c.use_rslora)
        lm = from_batch(net.from_codes(mix), 0, c.alpha, c.use_rslora)
    assert lm.rank == c.rank
    for m in codes:
        for i in range(net.shapes.n_layers):
            expect = a * l1.delta(m, i) + b * l2.delta(m, i)
            got = lm.delta(m, i)
            assert expect.abs().max() > 1e-6
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(arch, all_shapes):
    net = _net(arch, all_shapes).train()
    out = net(_emb(2))
    loss = sum(A.sum() + B.sum() for A, B in out.values())
    loss.backward()
    params = dict(net.named_parameters())
    assert params, "no trainable parameters"
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    nonfinite = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert not nonfinite
    zero = [n for n, p in params.items() if p.grad.abs().sum() == 0]
    assert not zero, f"gradient is identically zero for {zero}"
    # the offsets are fixed buffers, not trained
    assert not any(n.startswith(("offset_", "AB_offset.")) for n in params)
    buffers = dict(net.named_buffers())
    if arch in ("t2l-L", "t2l-M"):  # Text-to-LoRA's per-layer offsets
        assert all(f"AB_offset.{ab}.{m}" in buffers for m in all_shapes.modules for ab in "AB")
    else:
        assert all(f"offset_{m}" in buffers for m in all_shapes.modules)


def test_parameter_count_ordering(tiny_shapes):
    def count(arch):
        return sum(p.numel() for p in make_hypernet(arch, tiny_shapes, randomize=False).parameters())

    n = {a: count(a) for a in ARCHS}
    assert n["t2l-L"] > n["t2l-M"] > n["t2l-S"]
    assert n["zhyper-diag"] < n["zhyper-square"]


# ---- a follow network ----------------------------------------------------------------------------

def test_follow_config_serves_twice_the_rank_at_the_same_scale_per_rank():
    c = HyperConfig(arch="zhyper-diag", rank=4, alpha=8, follow=True)
    assert c.served_rank == 8 and c.alpha_for(8) / math.sqrt(8) == pytest.approx(c.scaling) and c.alpha_for(4) == 8
    c = HyperConfig(arch="zhyper-diag", rank=4, alpha=8, use_rslora=False, follow=True)
    assert c.alpha_for(8) / 8 == pytest.approx(c.scaling)
    assert HyperConfig(rank=4).served_rank == 4


def test_strength_one_is_the_first_network_and_s_adds_the_follow_adapter_s_minus_one_times(hypernet_factory):
    net = hypernet_factory("zhyper-diag", seed=6, follow=True)
    c, x = net.config, _emb(2, seed=4)
    with torch.no_grad():
        codes = net.codes(x)
        served = {s: from_batch(net.from_codes(net.at_strength(codes, s)), 1, c.alpha_for(r), c.use_rslora)
                  for s, r in ((1.0, c.rank), (3.0, c.served_rank))}
        per_row = from_batch(net.from_codes(net.at_strength(codes, torch.tensor([1.0, 3.0]))), 1,
                             c.alpha_for(c.served_rank), c.use_rslora)
        alone = from_batch(net.first_network()(x), 1, c.alpha, c.use_rslora)
        follow = from_batch(net.follow(x), 1, c.alpha, c.use_rslora)
        at_one = from_batch(net(x), 1, c.alpha, c.use_rslora)
    assert served[3.0].rank == per_row.rank == c.served_rank == 2 * c.rank
    assert served[1.0].rank == at_one.rank == c.rank  # an idle follow network costs nothing
    for m in codes:
        for i in range(net.shapes.n_layers):
            assert follow.delta(m, i).abs().max() > 1e-4
            torch.testing.assert_close(served[1.0].delta(m, i), alone.delta(m, i), rtol=0, atol=1e-7)
            torch.testing.assert_close(at_one.delta(m, i), alone.delta(m, i), rtol=0, atol=1e-7)
            want = alone.delta(m, i) + 2 * follow.delta(m, i)
            torch.testing.assert_close(served[3.0].delta(m, i), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(per_row.delta(m, i), want, rtol=1e-5, atol=1e-6)


def test_folded_codes_can_leave_an_idle_follow_network_out(hypernet_factory):
    net = hypernet_factory("zhyper-diag", seed=7, follow=True)
    x = _emb(3, seed=5)
    with torch.no_grad():
        want = net.first_network().codes(x)
    got = FoldedCodes(net)(x, follow=False)
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)
