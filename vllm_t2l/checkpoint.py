"""Hypernetwork checkpoints in the project's own format (published Text-to-LoRA folders: ``t2l_folder``).

Own format, a folder:
    config.json          {"format": "vllm-t2l", "version": 2, "hypernet": {...}, "base": {...},
                          "embedder": {...}, "trained": bool, "card": {...}}
    hypernet.safetensors the state dict

Nothing here unpickles anything: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vllm_t2l.embed import EmbedderConfig
from vllm_t2l.hypernet import BaseShapes, HyperConfig, HyperNet
from vllm_t2l.names import NameLimits

FORMAT = "vllm-t2l"
VERSION = 2  # 2: t2l-* run Text-to-LoRA's own wiring; version 1 is read for Zhyper only (its wiring is unchanged)
CONFIG = "config.json"
WEIGHTS = "hypernet.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    hypernet: HyperNet
    embedder: EmbedderConfig
    trained: bool = False
    card: dict = field(default_factory=dict)
    id: str = ""

    @property
    def config(self) -> HyperConfig:
        return self.hypernet.config

    @property
    def base(self) -> BaseShapes:
        return self.hypernet.shapes

    @property
    def recommended_strength(self) -> float:
        """The strength its card recommends (the one it was trained to follow at), else 1: the alignment prompt."""
        value = self.card.get("recommended_strength", 1.0)
        ok = isinstance(value, (int, float)) and 0 < value <= NameLimits().max_strength
        return float(value) if ok else 1.0

    def check_base(self, served: BaseShapes) -> None:
        """Refuse to serve adapters for a model whose shapes differ from the training base."""
        diff = self.base.differences(served)
        if diff:
            raise CheckpointError(
                f"checkpoint was built for {self.base.name!r}, whose shapes differ from the served model "
                f"{served.name!r}: " + "; ".join(diff))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.hypernet.state_dict().items()}
        save_file(state, folder / WEIGHTS)
        meta = {"format": FORMAT, "version": VERSION, "hypernet": self.config.to_dict(),
                "base": self.base.to_dict(), "embedder": self.embedder.to_dict(),
                "trained": self.trained, "card": self.card}
        (folder / CONFIG).write_text(json.dumps(meta, indent=2))
        self.id = _fingerprint(meta, folder / WEIGHTS)
        return folder


def _fingerprint(meta: dict, weights: Path) -> str:
    """What identifies the adapters a checkpoint makes: its weights and config, but not the card,
    so editing the card's notes keeps the id (and the adapter cache keyed by it)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "card"}, sort_keys=True).encode())
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_config(folder: str | Path) -> tuple[dict, HyperConfig, BaseShapes, EmbedderConfig]:
    """The checkpoint's metadata, checked, without loading its weights."""
    folder = Path(folder)
    if (folder / "hypermod.pt").exists():
        raise CheckpointError(f"{folder} is a published Text-to-LoRA folder: import it with "
                              "`vllm-t2l import-t2l` (needs the base model's config.json)")
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder / CONFIG} is missing: not a vllm-t2l checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder / CONFIG} must hold a JSON object")
    if meta.get("format") != FORMAT or meta.get("version") not in (1, VERSION):
        raise CheckpointError(f"{folder / CONFIG}: expected format {FORMAT!r} version {VERSION}, "
                              f"got {meta.get('format')!r} version {meta.get('version')}")
    arch = meta.get("hypernet", {}).get("arch", "") if isinstance(meta.get("hypernet"), dict) else ""
    if meta["version"] == 1 and str(arch).startswith("t2l"):
        raise CheckpointError(
            f"{folder / CONFIG}: a version 1 {arch} checkpoint uses this project's earlier T2L wiring (mixer "
            "with a residual, no SiLU after the trunk blocks, B laid out [out, r]), which is no longer run: "
            "retrain it, or re-import the published folder with `vllm-t2l import-t2l`")
    try:
        config = HyperConfig(**meta["hypernet"])
        shapes = BaseShapes.from_dict(meta["base"])
        embedder = EmbedderConfig(**meta["embedder"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder / CONFIG} is incomplete or invalid: {e}") from None
    return meta, config, shapes, embedder


def load(folder: str | Path, device: str = "cpu") -> Checkpoint:
    folder = Path(folder)
    meta, config, shapes, embedder = read_config(folder)
    try:
        state = load_file(folder / WEIGHTS)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / WEIGHTS} cannot be read: {e}") from None
    net = HyperNet(config, shapes)
    load_state(net, state, str(folder / WEIGHTS))
    ckpt = Checkpoint(net.to(device).eval(), embedder, bool(meta.get("trained")), meta.get("card", {}))
    ckpt.id = _fingerprint(meta, folder / WEIGHTS)
    return ckpt


def load_state(net: HyperNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Fill ``net`` from ``state``, refusing missing, unexpected, misshapen or non-finite tensors by name."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        raise CheckpointError(f"{source} does not fit the configured hypernetwork: " + ", ".join(parts))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite values in {bad[:5]}")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
