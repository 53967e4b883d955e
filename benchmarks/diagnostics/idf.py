"""A static embedder's description with description-idf token weights: words that many training descriptions
share (the frames "In every answer, ...", "End every reply with the word ...") count less than the words that
tell behaviours apart ("pirate", "Cheers"). The static table already weights rows by log(1 + token id), a
proxy for rarity in general text; this asks what rarity among descriptions adds. A diagnostic: no checkpoint
is trained on it (docs/experiments.md, "A sharper embedding for the follow network").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vllm_t2l.embed import Embedder, scale
from vllm_t2l.train import data


def training_descriptions() -> list[str]:
    """Every packaged training description: the training prompts' and the dial poles' wordings."""
    texts = [d for p in data.load_prompts() if p["split"] == "train" for d in p["descriptions"]]
    return texts + [w for p in data.load_dials() for w in p["descriptions"]]


def description_idf(tokenizer, alpha: float) -> torch.Tensor:
    """[vocab] log((N + 1) / (df + 1)) ** alpha, df counting the training descriptions holding the token."""
    texts = training_descriptions()
    df = Counter(i for enc in tokenizer.encode_batch(texts, add_special_tokens=False) for i in set(enc.ids))
    idf = torch.full((tokenizer.get_vocab_size(),), math.log(len(texts) + 1))
    for token, n in df.items():
        idf[token] = math.log((len(texts) + 1) / (n + 1))
    return idf ** alpha


def idf_embedder(embedder: Embedder, alpha: float) -> Callable[[list[str]], torch.Tensor]:
    """``embedder`` (a static one) with each token's row also weighted by its description-idf ** ``alpha``."""
    table = embedder._lookup
    if table is None:
        raise SystemExit(f"description-idf weights need a static embedder; {embedder.config.name} is not one")
    weights = description_idf(table.tokenizer, alpha)
    rows = table.embedding.weight

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        ids = [enc.ids for enc in table.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        flat = torch.tensor([i for seq in ids for i in seq], dtype=torch.long)
        offsets = torch.tensor([0] + [len(seq) for seq in ids[:-1]]).cumsum(0)
        pooled = F.embedding_bag(flat, rows, offsets, mode="sum", per_sample_weights=weights[flat].to(rows.dtype))
        return scale(pooled.float(), embedder.config.scale_sqrt_dim)

    return embed
