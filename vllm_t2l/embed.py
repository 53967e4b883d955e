"""Description texts -> embeddings, with the scaling the hypernetwork was trained on."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class EmbedderConfig:
    """Recorded in every checkpoint: a hypernetwork only understands the embedder it was trained with."""

    name: str
    dim: int
    pooling: str = "mean"  # the model's own pooling mode ("mean", "cls", ...), checked at load
    scale_sqrt_dim: bool = True  # L2-normalise, then multiply by sqrt(dim), as Text-to-LoRA does
    max_tokens: int = 512
    # "transformers": AutoModel + AutoTokenizer and the pooling above ("cls" or "last"), exactly as the
    # published Text-to-LoRA code embeds; "sentence-transformers": the folder's own modules.
    backend: str = "sentence-transformers"
    add_full_stop: bool = False  # Text-to-LoRA appends "." to a description that ends in a letter
    dtype: str = "float32"  # the transformers backend's weights (Text-to-LoRA: float32 for gte, else bfloat16)

    def to_dict(self) -> dict:
        return asdict(self)


class EmbedderError(ValueError):
    """The embedder cannot be loaded as the checkpoint needs; the message says why and what to pass."""


TRUST_FLAG = "--trust-embedder-code (VLLM_T2L_TRUST_EMBEDDER_CODE=1 when serving)"


def add_full_stop(text: str) -> str:
    """Text-to-LoRA's description clean-up: strip, then end with "." when the last character is a letter."""
    text = text.strip()
    return text + "." if text and text[-1].isalpha() else text


class Embedder:
    """A local embedder (never a hub download): a sentence-transformers folder, or, for imported
    Text-to-LoRA checkpoints, a transformers folder pooled as upstream pools it.

    ``trust_remote_code`` lets a folder that ships its own modelling code (gte-large-en-v1.5 does) run
    it; off by default, and the error that says it is needed names the flag.
    """

    def __init__(self, config: EmbedderConfig, path: str, device: str = "cpu", trust_remote_code: bool = False):
        self.config = config
        if config.backend == "transformers":
            self.model = TransformersEncoder(config, path, device, trust_remote_code)
            return
        if config.backend != "sentence-transformers":
            raise EmbedderError(f"unknown embedder backend {config.backend!r}")
        self.model = _load(path, device, config.max_tokens)
        pooling, got = _pooling(self.model), self.model.get_embedding_dimension()
        if pooling and pooling != config.pooling:
            raise EmbedderError(f"embedder {path} pools by {pooling!r}; the checkpoint expects {config.pooling!r}")
        if got != config.dim:
            raise EmbedderError(f"embedder {path} gives {got}-d vectors; the checkpoint expects {config.dim}")

    @classmethod
    def describe(cls, path: str, name: str, device: str = "cpu") -> Embedder:
        """Load a new embedder and record what it is (for a checkpoint about to be trained)."""
        self = cls.__new__(cls)
        self.model = _load(path, device, EmbedderConfig.max_tokens)
        self.config = EmbedderConfig(name=name, dim=self.model.get_embedding_dimension(),
                                     pooling=_pooling(self.model) or "mean")
        return self

    @cached_property
    def _lookup(self):
        """The model's StaticEmbedding when it is nothing else (a lookup table), else None."""
        if isinstance(self.model, TransformersEncoder):
            return None
        return self.model[0] if len(self.model) == 1 and type(self.model[0]).__name__ == "StaticEmbedding" else None

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        if self.config.add_full_stop:
            texts = [add_full_stop(t) for t in texts]
        if isinstance(self.model, TransformersEncoder):
            emb = self.model(texts)
        elif (table := self._lookup) is not None:
            # A cold miss waits on this: encode()'s batching costs ~0.2 ms, three times the lookup itself.
            device = table.embedding.weight.device
            features = {k: v.to(device) for k, v in table.preprocess(texts).items()}
            emb = table(features)["sentence_embedding"].float()
        else:
            emb = self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=False,
                                    batch_size=max(1, len(texts)), show_progress_bar=False).float()
        return scale(emb, self.config.scale_sqrt_dim)


class TransformersEncoder:
    """AutoModel + AutoTokenizer from a local folder, pooled by the first ("cls") or the last real
    ("last") token of right-padded, truncated input: Text-to-LoRA's own embedding step."""

    def __init__(self, config: EmbedderConfig, path: str, device: str, trust_remote_code: bool):
        from transformers import AutoModel, AutoTokenizer

        if config.pooling not in ("cls", "last"):
            raise EmbedderError(f"the transformers embedder pools by 'cls' or 'last', not {config.pooling!r}")
        try:
            meta = json.loads((Path(path) / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EmbedderError(f"embedder {path} has no readable config.json ({type(e).__name__}): "
                                "pass the local folder of the checkpoint's embedder") from None
        if meta.get("auto_map") and not trust_remote_code:
            raise EmbedderError(f"embedder {path} ships its own modelling code (auto_map in its config.json), "
                                f"which runs only with {TRUST_FLAG}")
        kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(path, dtype=getattr(torch, config.dtype), **kw).to(device).eval()
        self.config, self.device = config, torch.device(device)
        got = self.model.config.hidden_size
        if got != config.dim:
            raise EmbedderError(f"embedder {path} gives {got}-d vectors; the checkpoint expects {config.dim}")

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_tokens,
                             return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        if self.config.pooling == "cls":
            return hidden[:, 0].float()
        last = enc["attention_mask"].sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def _load(path: str, device: str, max_tokens: int):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device, local_files_only=True)
    try:
        model.max_seq_length = max_tokens
    except AttributeError:  # a static (lookup-table) embedder has no length limit to set
        pass
    return model


def _pooling(model) -> str | None:
    return next((m.get_config_dict().get("pooling_mode") for m in model if type(m).__name__ == "Pooling"), None)


def scale(emb: Tensor, sqrt_dim: bool) -> Tensor:
    emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb * math.sqrt(emb.shape[-1]) if sqrt_dim else emb
