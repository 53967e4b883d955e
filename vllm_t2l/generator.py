"""AdapterSpec -> LoRAWeights: the one place that ties embedder, hypernetwork and LoRA math together."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vllm_t2l import checkpoint as ckpt_mod
from vllm_t2l.checkpoint import Checkpoint
from vllm_t2l.embed import Embedder
from vllm_t2l.hypernet import FoldedCodes
from vllm_t2l.lora import LoRAWeights, from_batch
from vllm_t2l.names import AdapterSpec


class Generator:
    """Generates adapters for many specs in one embedder call and one hypernetwork forward pass."""

    def __init__(self, checkpoint: Checkpoint, embedder: Embedder):
        self.checkpoint = checkpoint
        self.embedder = embedder
        self.device = next(checkpoint.hypernet.parameters()).device
        self._codes = FoldedCodes(checkpoint.hypernet) if self.zhyper else None

    @classmethod
    def load(cls, checkpoint: str | Path, embedder_path: str | Path | None = None,
             device: str = "cpu", trust_embedder_code: bool = False) -> Generator:
        """``trust_embedder_code``: let an embedder that ships its own modelling code run it (opt-in)."""
        ckpt = ckpt_mod.load(checkpoint, device=device)
        path = embedder_path or _local_embedder(ckpt.embedder.name)
        return cls(ckpt, Embedder(ckpt.embedder, str(path), device=device, trust_remote_code=trust_embedder_code))

    @property
    def id(self) -> str:
        return self.checkpoint.id

    @property
    def zhyper(self) -> bool:
        return self.checkpoint.config.arch.startswith("zhyper")

    def rank_of(self, spec: AdapterSpec) -> int:
        """Rank of the served adapter: weight-space mixes of T2L adapters concatenate ranks."""
        c = self.checkpoint.config
        if self.zhyper:  # a follow network adds its ranks above strength 1
            return c.served_rank if spec.strength != 1 else c.rank
        return c.rank if spec.mode == "emb" else c.rank * len(spec.terms)

    @torch.no_grad()
    def generate(self, specs: Sequence[AdapterSpec], timings: dict[str, float] | None = None) -> list[LoRAWeights]:
        """One adapter per spec. ``timings``, when given, receives the seconds spent embedding the
        descriptions (``embed``) and in the hypernetwork (``hypernet``)."""
        c, net = self.checkpoint.config, self.checkpoint.hypernet
        if self.zhyper:
            codes = self.codes(specs, timings)
            start = time.perf_counter()
            out = [from_batch(net.from_codes(z), 0, c.alpha_for(self.rank_of(s)), c.use_rslora)
                   for s, z in zip(specs, codes)]
            self._lap(timings, "hypernet", start)
            return out
        x, slices, start = self._inputs(specs, timings)
        batch = net(x)
        out = []
        for spec, idx in zip(specs, slices):
            parts = [from_batch(batch, i, c.alpha, c.use_rslora) for i in idx]
            weights = [spec.strength * w for w in _row_weights(spec)]
            if len(parts) == 1 and weights == [1.0]:
                out.append(parts[0])
            else:
                out.append(LoRAWeights.weighted_sum(parts, weights))
        self._lap(timings, "hypernet", start)
        return out

    @torch.no_grad()
    def codes(self, specs: Sequence[AdapterSpec], timings: dict[str, float] | None = None) -> list[dict[str, Tensor]]:
        """Zhyper only: each spec's codes per module, [1, L, r] (or [1, L, r, r]), its mix applied.
        Mixing codes is exact: A is linear in them and B does not depend on them; so is the strength."""
        x, slices, start = self._inputs(specs, timings)
        codes, net = self._codes(x, follow=any(s.strength != 1 for s in specs)), self.checkpoint.hypernet
        out = [net.at_strength({m: sum(w * z[i:i + 1] for w, i in zip(_row_weights(spec), idx))
                                for m, z in codes.items()}, spec.strength)
               for spec, idx in zip(specs, slices)]
        self._lap(timings, "hypernet", start)
        return out

    def _inputs(self, specs: Sequence[AdapterSpec],
                timings: dict[str, float] | None) -> tuple[Tensor, list[range], float]:
        """Embed every description once; return the hypernetwork's input rows, which rows belong to
        which spec (an emb-mode mix is one mixed row), and the time embedding ended."""
        start = time.perf_counter()
        texts = sorted({d for s in specs for d in s.descriptions})
        emb = self.embedder(texts).to(self.device)
        start = self._lap(timings, "embed", start)
        row = {t: i for i, t in enumerate(texts)}
        rows, slices = [], []
        for spec in specs:
            first = len(rows)
            if spec.mode == "emb":
                rows.append(sum(w * emb[row[d]] for d, w in spec.terms))
            else:
                rows.extend(emb[row[d]] for d in spec.descriptions)
            slices.append(range(first, len(rows)))
        return torch.stack(rows), slices, start

    def _lap(self, timings: dict[str, float] | None, stage: str, start: float) -> float:
        """Add the seconds since ``start`` (after the device's queued work) to ``timings[stage]``; return now."""
        if timings is None:
            return start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - start
        return now

    def generate_one(self, spec: AdapterSpec) -> LoRAWeights:
        return self.generate([spec])[0]


def _row_weights(spec: AdapterSpec) -> list[float]:
    """Weights of a spec's hypernetwork rows: an emb-mode mix is already one mixed row."""
    return [1.0] if spec.mode == "emb" else spec.weights


def _local_embedder(name: str) -> Path:
    """The checkpoint's embedder as a local folder: never fetched from a hub."""
    from vllm_t2l.models import (
        DEFAULT_EMBEDDER_NAME,
        STATIC_EMBEDDER_NAME,
        default_embedder_path,
        prepare_static_embedder,
    )

    if name == DEFAULT_EMBEDDER_NAME:
        return default_embedder_path()
    if name == STATIC_EMBEDDER_NAME:
        return prepare_static_embedder()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ckpt_mod.CheckpointError(
            f"the checkpoint's embedder {name!r} is not a local folder; pass its path "
            "(--embedder, or VLLM_T2L_EMBEDDER when serving)")
    return path
