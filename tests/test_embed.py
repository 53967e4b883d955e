"""Tests for vllm_t2l.embed with the real embedded all-MiniLM-L6-v2 (offline, from its PyPI package)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from vllm_t2l.embed import Embedder, EmbedderConfig, EmbedderError, add_full_stop, scale
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
    assert c.to_dict() == {"name": "x", "dim": 10, "pooling": "cls", "scale_sqrt_dim": False, "max_tokens": 7,
                           "backend": "sentence-transformers", "add_full_stop": False, "dtype": "float32"}
    assert EmbedderConfig(**c.to_dict()) == c


def test_describe_records_the_model_it_loads(minilm):
    described = Embedder.describe(str(default_embedder_path()), DEFAULT_EMBEDDER_NAME)
    assert described.config == EmbedderConfig(name=DEFAULT_EMBEDDER_NAME, dim=384, pooling="mean")
    torch.testing.assert_close(described(TEXTS), minilm(TEXTS))


# ---- Text-to-LoRA's embedding step (the transformers backend) ----------------------------------

def test_add_full_stop():
    assert add_full_stop("  Talk like a pirate  ") == "Talk like a pirate."
    assert add_full_stop("Talk like a pirate.") == "Talk like a pirate."
    assert add_full_stop("Are you sure?") == "Are you sure?"
    assert add_full_stop("Count to 3") == "Count to 3"
    assert add_full_stop("Sprich wie ein Seemann, schön") == "Sprich wie ein Seemann, schön."
    assert add_full_stop("   ") == ""


def t2l_config(**kw) -> EmbedderConfig:
    """What an imported checkpoint records for gte, at MiniLM's width (gte itself cannot be downloaded here)."""
    return EmbedderConfig(**{"name": "minilm", "dim": 384, "pooling": "cls", "backend": "transformers",
                             "add_full_stop": True, "max_tokens": 8192, **kw})


def upstream_embedding(path, texts: list[str]) -> torch.Tensor:
    """Upstream's steps written out: full stop, AutoModel, right padding, CLS, float32, L2 * sqrt(d)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    texts = [t.strip() + "." if t.strip()[-1].isalpha() else t.strip() for t in texts]
    enc = tok(texts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
    with torch.no_grad():
        pooled = model(**enc).last_hidden_state[:, 0].float()
    return torch.nn.functional.normalize(pooled, dim=-1) * math.sqrt(pooled.shape[-1])


def test_transformers_backend_embeds_as_text_to_lora():
    path = str(default_embedder_path())
    e = Embedder(t2l_config(), path)
    texts = ["Talk like a pirate", "Answer in as few words as possible.", "Why?"]
    got = e(texts)
    torch.testing.assert_close(got, upstream_embedding(path, texts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.full((3,), math.sqrt(384)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(e(["Talk like a pirate."])[0], got[0], rtol=1e-4, atol=1e-4)  # padding-free alone
    # CLS pooling differs from the folder's own mean pooling, so the backend is really in use
    mean = Embedder(EmbedderConfig("minilm", 384), path)(["Talk like a pirate."])[0]
    assert torch.nn.functional.cosine_similarity(got[0], mean, dim=0) < 0.99
    no_stop = Embedder(t2l_config(add_full_stop=False), path)(["Talk like a pirate"])[0]
    assert (no_stop - got[0]).abs().max() > 1e-3


def test_transformers_backend_last_token_pooling():
    from transformers import AutoModel, AutoTokenizer

    path = str(default_embedder_path())
    e = Embedder(t2l_config(pooling="last"), path)
    texts = ["Be terse.", "Answer every question with a long and careful explanation."]
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        want = torch.stack([model(**tok([t], return_tensors="pt")).last_hidden_state[0, -1] for t in texts])
    torch.testing.assert_close(e(texts), scale(want, True), rtol=1e-4, atol=1e-4)


def remote_code_folder(tmp_path):
    """The packaged MiniLM with its model class in a file of its own, as gte-large-en-v1.5 ships its code."""
    src = default_embedder_path()
    folder = tmp_path / "remote"
    folder.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f, folder / f.name)
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_shipped.ShippedModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_shipped.py").write_text(
        "from transformers import BertModel\n\n\nclass ShippedModel(BertModel):\n    ran_shipped_code = True\n")
    return folder


def test_remote_code_needs_the_opt_in_flag(tmp_path):
    folder = remote_code_folder(tmp_path)
    with pytest.raises(EmbedderError, match="--trust-embedder-code") as e:
        Embedder(t2l_config(), str(folder))
    assert "auto_map" in str(e.value) and "\n" not in str(e.value)
    trusted = Embedder(t2l_config(), str(folder), trust_remote_code=True)
    assert getattr(trusted.model.model, "ran_shipped_code", False)
    plain = Embedder(t2l_config(), str(default_embedder_path()))
    torch.testing.assert_close(trusted(TEXTS), plain(TEXTS))


def test_transformers_backend_refusals(tmp_path):
    with pytest.raises(EmbedderError, match="no readable config.json"):
        Embedder(t2l_config(), str(tmp_path))
    with pytest.raises(EmbedderError, match="384-d vectors; the checkpoint expects 1024"):
        Embedder(t2l_config(dim=1024), str(default_embedder_path()))
    with pytest.raises(EmbedderError, match="'cls' or 'last'"):
        Embedder(t2l_config(pooling="mean"), str(default_embedder_path()))
