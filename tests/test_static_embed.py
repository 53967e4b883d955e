"""Tests for vllm_t2l.static_embed: the distilled table is what its docstring says, and serves as an Embedder."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_t2l.models import default_embedder_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_embedder_path()), device="cpu", local_files_only=True)


def _table(embedder) -> torch.Tensor:
    return embedder.model[0].embedding.weight.detach()


def test_rows_are_the_source_outputs_centred_and_weighted(static_minilm, source):
    """row_t / log(1 + t) = f(t) - mean, so differences of two rows cancel the mean: check against f directly."""
    table, tok = _table(static_minilm), source.tokenizer
    ids = tok("pirate formally", add_special_tokens=False)["input_ids"] + [2000, 29999]
    framed = torch.tensor([[tok.cls_token_id, t, tok.sep_token_id] for t in ids])
    with torch.no_grad():
        f = source[0].auto_model(input_ids=framed).last_hidden_state.mean(dim=1)
    unweighted = table[ids] / torch.log1p(torch.tensor(ids, dtype=torch.float32))[:, None]
    torch.testing.assert_close(unweighted[1:] - unweighted[0], f[1:] - f[0], rtol=1e-4, atol=1e-4)
    everything = table[1:] / torch.log1p(torch.arange(1, len(table), dtype=torch.float32))[:, None]
    assert everything.mean(0).norm() < 1e-3 * everything.norm(dim=1).mean()  # centred (row 0 has weight 0)


def test_description_is_the_normalised_sum_of_its_token_rows(static_minilm, source):
    text = "Answer like a patient math tutor."
    ids = source.tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = torch.nn.functional.normalize(_table(static_minilm)[ids].sum(0), dim=0) * math.sqrt(384)
    torch.testing.assert_close(static_minilm([text])[0], expected, rtol=1e-5, atol=1e-5)


def test_paraphrase_is_closer_than_an_unrelated_description(static_minilm):
    emb = static_minilm(["Talk like a pirate.", "Speak like a pirate, matey.",
                         "Answer in as few words as possible."]) / math.sqrt(384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_batch_independent(static_minilm):
    texts = ["Be terse.", "Explain every step in great detail, with numbered lists."]
    both = static_minilm(texts)
    for i, t in enumerate(texts):
        torch.testing.assert_close(static_minilm([t])[0], both[i])


def test_lookup_path_equals_sentence_transformers_encode(static_minilm):
    """The Embedder skips encode() for a lookup table; the vectors must be the ones encode() gives."""
    from vllm_t2l.embed import scale

    texts = ["Be terse.", "Answer like a patient math tutor.", "Réponds en français, s'il te plaît. 🙂"]
    want = static_minilm.model.encode(texts, convert_to_tensor=True, normalize_embeddings=False)
    torch.testing.assert_close(static_minilm(texts), scale(want.float(), True), rtol=1e-6, atol=1e-6)
