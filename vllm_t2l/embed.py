"""Description texts -> embeddings, with the scaling the hypernetwork was trained on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

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

    def to_dict(self) -> dict:
        return asdict(self)


class Embedder:
    """A sentence-transformers model loaded from a local path (never a hub download)."""

    def __init__(self, config: EmbedderConfig, path: str, device: str = "cpu"):
        self.config = config
        self.model = _load(path, device, config.max_tokens)
        pooling, got = _pooling(self.model), self.model.get_embedding_dimension()
        if pooling and pooling != config.pooling:
            raise ValueError(f"embedder {path} pools by {pooling!r}; the checkpoint expects {config.pooling!r}")
        if got != config.dim:
            raise ValueError(f"embedder {path} gives {got}-d vectors; the checkpoint expects {config.dim}")

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
        return self.model[0] if len(self.model) == 1 and type(self.model[0]).__name__ == "StaticEmbedding" else None

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        if (table := self._lookup) is not None:
            # A cold miss waits on this: encode()'s batching costs ~0.2 ms, three times the lookup itself.
            device = table.embedding.weight.device
            features = {k: v.to(device) for k, v in table.preprocess(texts).items()}
            emb = table(features)["sentence_embedding"].float()
        else:
            emb = self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=False,
                                    batch_size=max(1, len(texts)), show_progress_bar=False).float()
        return scale(emb, self.config.scale_sqrt_dim)


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
