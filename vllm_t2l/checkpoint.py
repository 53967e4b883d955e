"""Hypernetwork checkpoints: the project's own format, and an importer for published Text-to-LoRA folders.

Own format, a folder:
    config.json          {"format": "vllm-t2l", "version": 1, "hypernet": {...}, "base": {...},
                          "embedder": {...}, "trained": bool, "card": {...}}
    hypernet.safetensors the state dict

Nothing here unpickles untrusted data: safetensors, JSON, YAML (safe loader), and torch.load with
weights_only=True for the published format.
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

FORMAT = "vllm-t2l"
VERSION = 1
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
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{folder / CONFIG}: expected format {FORMAT!r} version {VERSION}, "
                              f"got {meta.get('format')!r} version {meta.get('version')}")
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
    _load_state(net, state, str(folder / WEIGHTS))
    ckpt = Checkpoint(net.to(device).eval(), embedder, bool(meta.get("trained")), meta.get("card", {}))
    ckpt.id = _fingerprint(meta, folder / WEIGHTS)
    return ckpt


def _load_state(net: HyperNet, state: dict[str, torch.Tensor], source: str) -> None:
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


# ---- published Text-to-LoRA folders -----------------------------------------------------------

_T2L_KEYS = [  # (their prefix, our prefix)
    ("task_encoder.mlp.", "task_encoder."),
    ("layer_depth_encoder.", "layer_encoder."),
    ("layer_type_encoder.", "module_encoder."),
    ("mixer.", "mixer."),
    ("mlp1.mlp.", "block1.mlp."),
    ("mlp2.mlp.", "block2.mlp."),
    ("mlp3.", "to_head."),
    ("heads.", "heads."),
]


def import_t2l(folder: str | Path, base_config: str | Path, embedder_path: str | None = None) -> Checkpoint:
    """Convert a published Text-to-LoRA folder (hypermod.pt + args.yaml + adapter_config.json).

    Needs only the base model's config.json for the shapes, never its weights. The L and M
    variants map one to one; S encodes ranks differently from ours and is refused.
    Assumed layout (checked by shapes): an L head emits A then B, each row-major; ``AB_offset.<m>``
    buffers are added to the head output.
    """
    import yaml

    folder = Path(folder)
    try:
        args = yaml.safe_load((folder / "args.yaml").read_text())
        lora = json.loads((folder / "adapter_config.json").read_text())
        state = torch.load(folder / "hypermod.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} lacks {Path(e.filename).name}: not a Text-to-LoRA folder") from None
    except Exception as e:  # unpickling refused, corrupt zip, bad YAML/JSON
        raise CheckpointError(f"{folder} cannot be read safely: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{folder / 'hypermod.pt'} is not a state dict")
    if args.get("autoreg_gen"):
        raise CheckpointError("Text-to-LoRA S checkpoints (autoreg_gen) are not supported; L and M are")
    arch = "t2l-M" if args.get("shared_AB_head") else "t2l-L"
    modules = tuple(lora.get("target_modules") or args["target_modules"])
    emb_dim = state["task_encoder.mlp.0.weight"].shape[1]
    config = HyperConfig(arch=arch, emb_dim=emb_dim, latent=int(args["hypernet_latent_size"]),
                         head_in=int(args["head_in_size"]), rank=int(lora["r"]),
                         alpha=float(lora["lora_alpha"]), use_rslora=bool(lora.get("use_rslora", False)),
                         target_modules=modules)
    shapes = BaseShapes.from_config(base_config, modules, name=args.get("model_dir"))
    net = HyperNet(config, shapes)
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for theirs, mine in _T2L_KEYS:
            if key.startswith(theirs):
                ours[mine + key[len(theirs):]] = value
        if key.startswith("AB_offset."):
            ours[f"offset_{key.split('.', 1)[1]}"] = value
    if arch == "t2l-M":
        emb, w, b = state["out_emb.weight"], state["out_emb_norm.weight"], state["out_emb_norm.bias"]
        ours["ab_emb"] = torch.nn.functional.layer_norm(emb, emb.shape[-1:], w, b)
    for k, v in net.state_dict().items():  # a folder without AB_offset adds nothing to the heads
        if k.startswith("offset_"):
            ours.setdefault(k, torch.zeros_like(v))
    _load_state(net, ours, str(folder / "hypermod.pt"))
    emb_name = embedder_path or args.get("emb_model", "unknown")
    return Checkpoint(net.eval(), EmbedderConfig(name=emb_name, dim=emb_dim, pooling="cls"),
                      trained=True, card={"imported_from": str(folder), "arch": arch})
