import json

import pytest
import torch

from benchmarks.diagnostics.follow_quick import adapters, main
from benchmarks.diagnostics.idf import description_idf, idf_embedder
from vllm_t2l.generator import Generator
from vllm_t2l.models import DEFAULT_CHECKPOINT, MINILM_CHECKPOINT

TEXTS = ["Talk like a pirate in every answer.", "End every reply with the word Cheers."]


@pytest.fixture(scope="module")
def gen():
    return Generator.load(DEFAULT_CHECKPOINT)


def test_description_idf_weighs_a_frame_word_below_a_behaviour_word(gen):
    tokenizer = gen.embedder._lookup.tokenizer
    idf = description_idf(tokenizer, 1.0)
    every, pirate = (tokenizer.token_to_id(w) for w in ("every", "pirate"))
    assert 0 < idf[every] < idf[pirate]
    assert torch.equal(description_idf(tokenizer, 0.0), torch.ones_like(idf))


def test_idf_weights_of_one_are_the_checkpoints_own_embedding(gen):
    assert torch.allclose(idf_embedder(gen.embedder, 0.0)(TEXTS), gen.embedder(TEXTS), atol=1e-5)
    sharp = idf_embedder(gen.embedder, 1.0)(TEXTS)
    assert sharp.shape == (2, 384) and not torch.allclose(sharp, gen.embedder(TEXTS), atol=1e-2)


def test_idf_weights_need_a_static_embedder():
    with pytest.raises(SystemExit, match="need a static embedder"):
        idf_embedder(Generator.load(MINILM_CHECKPOINT).embedder, 1.0)


def test_a_follow_network_fed_the_plain_embedding_makes_the_served_adapters(gen):
    plain = adapters(gen, TEXTS, 2.0)
    fed = adapters(gen, TEXTS, 2.0, idf_embedder(gen.embedder, 0.0))
    other = adapters(gen, TEXTS, 2.0, idf_embedder(gen.embedder, 1.0))
    for a, b, c in zip(plain, fed, other):
        assert a.rank == b.rank == c.rank and a.scaling == b.scaling
        for m in a.A:
            assert torch.allclose(a.A[m], b.A[m], atol=1e-4) and torch.equal(a.B[m], b.B[m])
            assert not torch.allclose(a.A[m], c.A[m], atol=1e-3)


def test_main_counts_the_descriptions_moved_and_writes_the_answers(capsys, tmp_path):
    main([str(DEFAULT_CHECKPOINT), "--descriptions", "2", "--queries", "1", "--max-tokens", "8",
          "--follow-idf", "0.5", "--answers", str(tmp_path / "answers.json")])
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert len(answers) == 3 and all(len(texts) == 1 and texts[0] for texts in answers.values())
    out = capsys.readouterr().out
    assert "at strength 2, follow network on idf ** 0.5: moved " in out and " of 2 (" in out
    assert out.splitlines()[-1].startswith("per behaviour: brevity ")


def test_follow_idf_at_strength_one_is_one_line():
    with pytest.raises(SystemExit, match="a strength other than 1"):
        main([str(DEFAULT_CHECKPOINT), "--strength", "1", "--follow-idf", "1"])


def test_a_strength_out_of_range_is_one_line():
    with pytest.raises(SystemExit, match="--strength: strength -1.0 is outside"):
        main([str(DEFAULT_CHECKPOINT), "--strength", "-1"])
