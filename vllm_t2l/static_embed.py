"""A lookup-table embedder distilled from a sentence-transformers model: cold misses without a transformer pass.

A transformer embedder costs ~10 ms per description on one CPU core, more than vLLM's whole load of an
adapter from disk. A static embedder is one row per vocabulary token, averaged over a description's
tokens. Each row is the source model's output for that token alone ([CLS] token [SEP], mean-pooled).
Two choices from the static-embedding literature (model2vec) bring paraphrases of one behaviour closer:
- subtract the mean row: the component every token shares says nothing about a description;
- weight rows by log(1 + token id): WordPiece ids grow roughly with rarity, so frequent words count less.
The weight is folded into the row: the embedding is later L2-normalised, so a weighted mean and a
weighted sum give the same direction.
"""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()  # not inference_mode: the table becomes an nn.Parameter
def token_table(source: str | Path, batch: int = 2048) -> tuple[torch.Tensor, object]:
    """Rows [vocab, dim] of the distilled table, and the source's tokenizer."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(source), device="cpu", local_files_only=True)
    tokenizer, encoder = model.tokenizer, model[0].auto_model.eval()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise ValueError(f"{source}: the tokenizer has no [CLS]/[SEP] tokens to frame single tokens with")
    vocab = tokenizer.vocab_size
    table = torch.empty(vocab, encoder.config.hidden_size)
    for start in range(0, vocab, batch):
        ids = torch.arange(start, min(vocab, start + batch))
        framed = torch.stack([torch.full_like(ids, cls), ids, torch.full_like(ids, sep)], dim=1)
        table[start:start + len(ids)] = encoder(input_ids=framed).last_hidden_state.mean(dim=1)
    table -= table.mean(dim=0)
    table *= torch.log1p(torch.arange(vocab, dtype=table.dtype))[:, None]
    return table, tokenizer


def distill(source: str | Path, out: str | Path) -> Path:
    """Write a sentence-transformers folder holding the static embedder (loads with SentenceTransformer)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    table, tokenizer = token_table(source)
    static = StaticEmbedding(tokenizer, embedding_weights=table)
    SentenceTransformer(modules=[static], device="cpu").save(str(out))
    return Path(out)
