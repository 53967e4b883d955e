"""Tests for vllm_t2l.generator: specs -> adapters with the real MiniLM and tiny hypernetworks."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hypernet

from vllm_t2l import checkpoint as ckpt_mod
from vllm_t2l.checkpoint import Checkpoint, CheckpointError
from vllm_t2l.embed import EmbedderConfig
from vllm_t2l.generator import Generator
from vllm_t2l.lora import LoRAWeights, from_batch
from vllm_t2l.models import DEFAULT_EMBEDDER_NAME
from vllm_t2l.names import parse

pytestmark = pytest.mark.usefixtures("one_thread")

R = 8  # the rank make_hypernet's configs use


def _assert_same_delta(a: LoRAWeights, b: LoRAWeights, tol: float = 1e-5) -> None:
    assert set(a.A) == set(b.A)
    for m in a.A:
        for i in range(a.n_layers):
            da, db = a.delta(m, i), b.delta(m, i)
            torch.testing.assert_close(da, db, rtol=tol, atol=tol * max(1.0, db.abs().max().item()))


def _differs(a: LoRAWeights, b: LoRAWeights) -> bool:
    return any(not torch.allclose(a.delta(m, i), b.delta(m, i), rtol=1e-4, atol=1e-6)
               for m in a.A for i in range(a.n_layers))


SPECS = ["t2l:Talk like a pirate.", "t2l:Answer tersely.", "t2l-mix:0.7*Talk like a pirate.||0.3*Be kind.",
         "t2l-mix[emb]:0.5*Answer tersely.||-0.5*Be kind.", "t2l:Answer tersely."]


def test_load_from_folder(tiny_checkpoint):
    gen = Generator.load(tiny_checkpoint)
    assert gen.zhyper and gen.id == ckpt_mod.load(tiny_checkpoint).id
    assert gen.device == torch.device("cpu")
    lora = gen.generate_one(parse("t2l:Talk like a pirate."))
    assert lora.rank == R and lora.n_layers == 3 and set(lora.A) == {"q_proj", "v_proj"}
    assert lora.A["q_proj"].shape == (3, R, 64) and lora.B["v_proj"].shape == (3, 32, R)
    assert lora.alpha == 16.0 and lora.use_rslora is True


def test_load_refuses_non_local_embedder(tmp_path, tiny_shapes):
    folder = Checkpoint(make_hypernet("zhyper-diag", tiny_shapes),
                        EmbedderConfig(name="someone/not-on-disk", dim=384)).save(tmp_path / "c")
    with pytest.raises(CheckpointError, match="'someone/not-on-disk' is not a local folder"):
        Generator.load(folder)


@pytest.mark.parametrize("which", ["zgen", "lgen"])
def test_batch_equals_one_by_one(which, request):
    gen: Generator = request.getfixturevalue(which)
    specs = [parse(n) for n in SPECS]
    together = gen.generate(specs)
    assert len(together) == len(specs)
    for spec, lora in zip(specs, together):
        alone = gen.generate_one(spec)
        assert lora.rank == alone.rank == gen.rank_of(spec)
        _assert_same_delta(lora, alone, tol=1e-4)


@pytest.mark.parametrize("which", ["zgen", "lgen"])
def test_same_description_same_weights(which, request):
    gen: Generator = request.getfixturevalue(which)
    a = gen.generate_one(parse("t2l:Talk like a pirate."))
    b = gen.generate_one(parse("t2l:Talk   like a pirate."))
    for m in a.A:
        assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m])
    # and within one batch, both copies are the same (up to the batch position's rounding)
    x, y = gen.generate([parse("t2l:Talk like a pirate."), parse("t2l:Talk like a pirate.")])
    for m in x.A:
        torch.testing.assert_close(x.A[m], y.A[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.B[m], y.B[m], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["zgen", "lgen"])
def test_different_descriptions_differ(which, request):
    gen: Generator = request.getfixturevalue(which)
    a, b = gen.generate([parse("t2l:Talk like a pirate."), parse("t2l:Write formal legal prose.")])
    assert _differs(a, b)


def test_zhyper_weight_mix_keeps_rank_and_is_exact(zgen):
    a, b, c = (zgen.generate_one(parse(f"t2l:{d}")) for d in ("Talk like a pirate.", "Be kind.", "Be brief."))
    spec = parse("t2l-mix:0.7*Talk like a pirate.||-0.4*Be kind.||1.5*Be brief.")
    mix = zgen.generate_one(spec)
    assert mix.rank == R == zgen.rank_of(spec)
    assert mix.alpha == a.alpha and mix.use_rslora == a.use_rslora
    for m in a.A:
        for i in range(a.n_layers):
            expect = 0.7 * a.delta(m, i) - 0.4 * b.delta(m, i) + 1.5 * c.delta(m, i)
            torch.testing.assert_close(mix.delta(m, i), expect, rtol=1e-4, atol=1e-6)


def test_t2l_weight_mix_concatenates_ranks_and_is_exact(lgen):
    a, b = (lgen.generate_one(parse(f"t2l:{d}")) for d in ("Talk like a pirate.", "Be kind."))
    spec = parse("t2l-mix:0.7*Talk like a pirate.||0.3*Be kind.")
    mix = lgen.generate_one(spec)
    assert mix.rank == 2 * R == lgen.rank_of(spec)
    assert mix.scaling == pytest.approx(1.0)
    for m in a.A:
        for i in range(a.n_layers):
            expect = 0.7 * a.delta(m, i) + 0.3 * b.delta(m, i)
            torch.testing.assert_close(mix.delta(m, i), expect, rtol=1e-4, atol=1e-6)
    three = parse("t2l-mix:0.2*a||0.3*b||0.5*c")
    assert lgen.generate_one(three).rank == 3 * R == lgen.rank_of(three)


@pytest.mark.parametrize("which", ["zgen", "lgen"])
@pytest.mark.parametrize("name", ["t2l[strength=2.5]:Be kind.", "t2l-mix[strength=2.5]:0.6*Be kind.||0.4*Be brief."])
def test_strength_scales_the_update_exactly(which, name, request):
    gen: Generator = request.getfixturevalue(which)
    plain = gen.generate_one(parse(name.replace("[strength=2.5]", "")))
    strong = gen.generate_one(parse(name))
    assert strong.rank == plain.rank == gen.rank_of(parse(name))
    for m in plain.A:
        for i in range(plain.n_layers):
            torch.testing.assert_close(strong.delta(m, i), 2.5 * plain.delta(m, i), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["t2l:Be kind.", "t2l-mix:0.6*Be kind.||0.4*Be brief.",
                                  "t2l-mix[emb]:0.6*Be kind.||0.4*Be brief."])
def test_a_follow_checkpoint_serves_its_first_network_at_strength_one_and_adds_the_rest(fgen, name):
    first = Generator(Checkpoint(fgen.checkpoint.hypernet.first_network(), fgen.checkpoint.embedder), fgen.embedder)
    def at(s: float) -> LoRAWeights:
        return fgen.generate_one(parse(name.replace(":", f"[strength={s}]:", 1).replace("[emb][", "[emb,")))

    spec = parse(name)
    at_one, at_two, at_more, alone = fgen.generate_one(spec), at(2), at(3.5), first.generate_one(spec)
    assert at_more.rank == fgen.rank_of(parse(name.replace(":", "[strength=3.5]:", 1).replace("[emb][", "[emb,")))
    assert at_more.rank == 2 * R and at_one.rank == alone.rank == fgen.rank_of(spec) == R
    _assert_same_delta(at_one, alone)
    for m in alone.A:
        for i in range(alone.n_layers):
            follow = at_two.delta(m, i) - alone.delta(m, i)
            assert follow.abs().max() > 1e-4
            torch.testing.assert_close(at_more.delta(m, i), alone.delta(m, i) + 2.5 * follow, rtol=1e-4, atol=1e-6)


def test_t2l_single_weighted_term(lgen):
    a = lgen.generate_one(parse("t2l:Be kind."))
    half = lgen.generate_one(parse("t2l-mix:0.5*Be kind."))
    assert half.rank == R
    for m in a.A:
        torch.testing.assert_close(half.delta(m, 1), 0.5 * a.delta(m, 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("which", ["zgen", "lgen"])
def test_emb_mix_has_rank_r_and_mixes_embeddings(which, request, minilm):
    gen: Generator = request.getfixturevalue(which)
    spec = parse("t2l-mix[emb]:0.6*Talk like a pirate.||0.4*Be kind.")
    lora = gen.generate_one(spec)
    assert lora.rank == R == gen.rank_of(spec)
    e = minilm(["Be kind.", "Talk like a pirate."])
    x = (0.6 * e[1] + 0.4 * e[0])[None]
    with torch.no_grad():
        out = gen.checkpoint.hypernet(x)
    c = gen.checkpoint.config
    _assert_same_delta(lora, from_batch(out, 0, c.alpha, c.use_rslora), tol=1e-4)
    # not the same as mixing in weight space
    assert _differs(lora, gen.generate_one(parse("t2l-mix:0.6*Talk like a pirate.||0.4*Be kind.")))


@pytest.mark.parametrize("which", ["zgen", "lgen"])
def test_rank_of(which, request):
    gen: Generator = request.getfixturevalue(which)
    names = ["t2l:x", "t2l-mix:1*x", "t2l-mix:0.5*x||0.5*y", "t2l-mix:0.1*x||0.2*y||0.3*z",
             "t2l-mix[emb]:0.1*x||0.2*y||0.3*z"]
    specs = [parse(n) for n in names]
    for spec, lora in zip(specs, gen.generate(specs)):
        assert gen.rank_of(spec) == lora.rank, spec
    if gen.zhyper:
        assert [gen.rank_of(s) for s in specs] == [R] * 5
    else:
        assert [gen.rank_of(s) for s in specs] == [R, R, 2 * R, 3 * R, R]


@pytest.mark.parametrize("which", ["zgen", "lgen"])
@pytest.mark.parametrize("mode", ["weight", "emb"])
def test_one_zero_mix_equals_first(which, mode, request):
    gen: Generator = request.getfixturevalue(which)
    first = gen.generate_one(parse("t2l:Talk like a pirate."))
    mix = gen.generate_one(parse(f"t2l-mix[{mode}]:1*Talk like a pirate.||0*Write formal legal prose."))
    _assert_same_delta(mix, first, tol=1e-4)


def test_embedder_config_from_checkpoint(zgen):
    assert zgen.checkpoint.embedder == EmbedderConfig(name=DEFAULT_EMBEDDER_NAME, dim=384)


@pytest.mark.parametrize("which", ["zgen", "lgen"])
def test_timings_record_embed_and_hypernet(which, request):
    gen: Generator = request.getfixturevalue(which)
    timings: dict[str, float] = {}
    specs = [parse("t2l:Talk like a pirate."), parse("t2l-mix:0.5*Be kind.||0.5*Be brief.")]
    with_timings = gen.generate(specs, timings)
    assert set(timings) == {"embed", "hypernet"} and all(t > 0 for t in timings.values())
    for a, b in zip(with_timings, gen.generate(specs)):
        _assert_same_delta(a, b)
