"""Tests for vllm_t2l.embed with the real embedded all-MiniLM-L6-v2 (offline, from its PyPI package)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_t2l.embed import Embedder, EmbedderConfig, scale
from vllm_t2l.models import DEFAULT_EMBEDDER_NAME, default_embedder_path

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Talk like a pirate.", "Answer in as few words as possible.",
         "Explain every step of your reasoning in great detail, with numbered lists and examples."]


def test_shape_and_norm(minilm):
    emb = minilm(TEXTS)
    assert emb.shape == (3, 384)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((3,), math.sqrt(384)), rtol=1e-5, atol=1e-4)


def test_deterministic_and_batch_independent(minilm):
    a = minilm(TEXTS)
    b = minilm(TEXTS)
    assert torch.equal(a, b)
    for i, t in enumerate(TEXTS):
        torch.testing.assert_close(minilm([t])[0], a[i], rtol=1e-4, atol=1e-4)


def test_different_texts_differ(minilm):
    emb = minilm(TEXTS) / math.sqrt(384)
    cos = emb @ emb.T
    off = cos[~torch.eye(3, dtype=torch.bool)]
    assert (off < 0.99).all()
    # a paraphrase is closer than an unrelated text
    p = minilm(["Speak like a pirate."])[0] / math.sqrt(384)
    assert p @ emb[0] > p @ emb[1]


def test_no_sqrt_dim_scaling():
    emb = Embedder(EmbedderConfig(DEFAULT_EMBEDDER_NAME, 384, scale_sqrt_dim=False),
                   str(default_embedder_path()))(TEXTS[:2])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2), rtol=1e-5, atol=1e-5)


def test_wrong_dim_raises():
    with pytest.raises(ValueError, match="384-d vectors; the checkpoint expects 768"):
        Embedder(EmbedderConfig(DEFAULT_EMBEDDER_NAME, 768), str(default_embedder_path()))


def test_wrong_pooling_raises():
    with pytest.raises(ValueError, match="pools by 'mean'; the checkpoint expects 'cls'"):
        Embedder(EmbedderConfig(DEFAULT_EMBEDDER_NAME, 384, pooling="cls"), str(default_embedder_path()))


def test_max_tokens_applied():
    e = Embedder(EmbedderConfig(DEFAULT_EMBEDDER_NAME, 384, max_tokens=16), str(default_embedder_path()))
    assert e.model.max_seq_length == 16
    long = " ".join(["pirate"] * 100)
    # everything after the 16th token is cut, so two texts sharing that prefix embed the same
    torch.testing.assert_close(e([long])[0], e([long + " and then something else entirely"])[0])


def test_scale_function():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(scale(x, sqrt_dim=False), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(scale(x, sqrt_dim=True), torch.tensor([[0.6, 0.8], [0.0, 1.0]]) * math.sqrt(2))


def test_config_to_dict():
    c = EmbedderConfig("x", 10, pooling="cls", scale_sqrt_dim=False, max_tokens=7)
    assert c.to_dict() == {"name": "x", "dim": 10, "pooling": "cls", "scale_sqrt_dim": False, "max_tokens": 7}
    assert EmbedderConfig(**c.to_dict()) == c


def test_describe_records_the_model_it_loads(minilm):
    described = Embedder.describe(str(default_embedder_path()), DEFAULT_EMBEDDER_NAME)
    assert described.config == EmbedderConfig(name=DEFAULT_EMBEDDER_NAME, dim=384, pooling="mean")
    torch.testing.assert_close(described(TEXTS), minilm(TEXTS))
