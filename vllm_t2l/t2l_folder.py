"""Published Text-to-LoRA folders (``hypermod.pt``, ``args.yaml``, ``adapter_config.json``) -> our checkpoint.

The project's t2l-L/M networks are wired as upstream's (SakanaAI/text-to-lora) are, so importing is a
renaming of keys plus what the folder's settings imply; nothing is approximated. What cannot be honoured
exactly is refused with a one-line reason. Only the base model's ``config.json`` is read, never its weights.
``hypermod.pt`` is read with ``torch.load(weights_only=True)``: plain tensors, nothing else unpickled.

Module order. Upstream numbers module types (the row of ``layer_type_encoder`` each uses) by a Python
set's iteration order in the training process. That order is recorded in one place: the order of the
``heads.<module>.weight`` keys in ``hypermod.pt``. ``adapter_config.json`` usually, but not always, lists
the same order, and ``args.yaml`` lists the command line's. So the heads' key order is used unless
``module_order`` is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from vllm_t2l.checkpoint import Checkpoint, CheckpointError, load_state
from vllm_t2l.embed import EmbedderConfig
from vllm_t2l.hypernet import BaseShapes, HyperConfig, HyperNet

# (their prefix, our prefix); keys not listed keep their name (AB_offset.*, out_emb.*, heads.*, ...).
KEYS = [
    ("task_encoder.mlp.", "task_encoder."),
    ("layer_depth_encoder.", "layer_encoder."),
    ("layer_type_encoder.", "module_encoder."),
    ("mlp1.mlp.", "block1.mlp."),
    ("mlp2.mlp.", "block2.mlp."),
    ("mlp3.", "to_head."),
]
RECON_KEYS = ("mean_recon_target.", "std_recon_target.")
MAX_TOKENS = 8192  # upstream's truncation of descriptions


def import_t2l(folder: str | Path, base_config: str | Path, embedder_path: str | None = None,
               module_order: Sequence[str] | None = None) -> Checkpoint:
    """Convert a published Text-to-LoRA L or M folder into a checkpoint that generates the adapters
    upstream's ``gen_lora`` generates (to float rounding). ``module_order`` overrides the training
    order read from ``hypermod.pt`` (see the module docstring)."""
    folder = Path(folder)
    args, lora, state = _read(folder)
    source = str(folder / "hypermod.pt")
    _refuse_unsupported(args, folder)
    heads = [k[len("heads."):-len(".weight")] for k in state if k.startswith("heads.") and k.endswith(".weight")]
    order = _module_order(heads, state, lora, module_order, folder)
    arch = "t2l-M" if args.get("shared_AB_head") else "t2l-L"
    biased = [m for m in order if f"heads.{m}.bias" in state]
    if biased and len(biased) != len(order):
        raise CheckpointError(f"{source}: heads {biased} have a bias and the others do not; upstream gives all or none")
    z_score, w_scale = _recon_mode(args, folder)
    if "task_encoder.mlp.0.weight" not in state:
        raise CheckpointError(f"{source} lacks task_encoder.mlp.0.weight: not a Text-to-LoRA hypernetwork")
    emb_dim = int(state["task_encoder.mlp.0.weight"].shape[1])
    try:
        config = HyperConfig(arch=arch, emb_dim=emb_dim, latent=int(args["hypernet_latent_size"]),
                             head_in=int(args["head_in_size"]), rank=int(lora["r"]),
                             alpha=float(lora["lora_alpha"]), use_rslora=bool(lora.get("use_rslora", False)),
                             target_modules=tuple(order), head_bias=bool(biased), z_score=z_score)
        shapes = BaseShapes.from_config(base_config, config.target_modules, name=args.get("model_dir"))
    except FileNotFoundError as e:
        raise CheckpointError(f"base config {e.filename} does not exist") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read the settings or the base config: {e!r}") from None
    net = HyperNet(config, shapes)
    ours = _rename(state, z_score)
    for k, v in net.state_dict().items():  # a folder without AB_offset adds nothing
        if k.startswith("AB_offset."):
            ours.setdefault(k, torch.zeros_like(v))
    if w_scale != 1.0:
        if any(ours[k].any() for k in ours if k.startswith("AB_offset.")):
            raise CheckpointError(f"{source}: recon without z-scores and with a non-zero AB_offset; upstream "
                                  "forbids that combination, so how it would be applied is not known")
        for m in order:  # A, B = head output / sqrt(delta_w_scaling): the head is linear, so scale it
            for part in ("weight", "bias"):
                if f"heads.{m}.{part}" in ours:
                    ours[f"heads.{m}.{part}"] = ours[f"heads.{m}.{part}"] * w_scale
    load_state(net, ours, source)
    pooling, dtype = _embedder_kind(str(args.get("emb_model") or ""), folder)
    embedder = EmbedderConfig(name=embedder_path or str(args["emb_model"]), dim=emb_dim, pooling=pooling,
                              backend="transformers", add_full_stop=True, max_tokens=MAX_TOKENS, dtype=dtype)
    card = {"imported_from": str(folder), "arch": arch, "upstream_embedder": args.get("emb_model"),
            "module_order": list(order),
            "module_order_source": "--module-order" if module_order else "hypermod.pt heads key order",
            "training_task": args.get("training_task", "sft")}
    return Checkpoint(net.eval(), embedder, trained=True, card=card)


def _read(folder: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    import yaml

    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    try:
        args = yaml.safe_load((folder / "args.yaml").read_text())
        lora = json.loads((folder / "adapter_config.json").read_text())
        state = torch.load(folder / "hypermod.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} lacks {Path(e.filename).name}: not a Text-to-LoRA folder") from None
    except Exception as e:  # unpickling refused, corrupt zip, bad YAML/JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder} cannot be read safely: {first}") from None
    if not isinstance(args, dict) or not isinstance(lora, dict):
        raise CheckpointError(f"{folder}: args.yaml and adapter_config.json must each hold a mapping")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{folder / 'hypermod.pt'} is not a state dict of tensors")
    return args, lora, {str(k): v.float() for k, v in state.items()}


def _refuse_unsupported(args: dict, folder: Path) -> None:
    if args.get("autoreg_gen"):
        raise CheckpointError(f"{folder}: Text-to-LoRA S checkpoints (autoreg_gen) are not supported; L and M are")
    if args.get("encoder_type", "linear") != "linear":
        raise CheckpointError(f"{folder}: task encoder {args['encoder_type']!r} is not supported; only 'linear' is")
    if args.get("use_one_hot_task_emb"):
        raise CheckpointError(f"{folder}: one-hot task embeddings are not supported; only text descriptions are")
    if args.get("training_task", "sft") not in ("sft", "recon"):
        raise CheckpointError(f"{folder}: training_task {args['training_task']!r} is not supported (sft, recon)")


def _module_order(heads: list[str], state: dict, lora: dict, given: Sequence[str] | None,
                  folder: Path) -> list[str]:
    targets = lora.get("target_modules")
    if not isinstance(targets, list):
        raise CheckpointError(f"{folder / 'adapter_config.json'}: target_modules must be a list, "
                              f"got {targets!r}")
    if not heads:
        raise CheckpointError(f"{folder / 'hypermod.pt'} has no heads.<module>.weight: not a Text-to-LoRA L/M "
                              "hypernetwork")
    if set(heads) != set(targets):
        raise CheckpointError(f"{folder}: hypermod.pt has heads for {sorted(heads)} but adapter_config.json "
                              f"targets {sorted(targets)}")
    if given:
        if sorted(given) != sorted(heads):
            raise CheckpointError(f"--module-order {','.join(given)} is not an order of the folder's modules "
                                  f"{sorted(heads)}")
        return list(given)
    emb_order = list(dict.fromkeys(k.split(".")[1] for k in state if k.startswith("out_emb.")))
    if emb_order and emb_order != heads:
        raise CheckpointError(f"{folder / 'hypermod.pt'}: the heads' key order {heads} and out_emb's "
                              f"{emb_order} disagree, so the training order is unknown; give --module-order")
    return heads


def _recon_mode(args: dict, folder: Path) -> tuple[bool, float]:
    """(z-scored targets?, factor on the head's output) for upstream's training task."""
    if args.get("training_task", "sft") != "recon":
        return False, 1.0
    z, factorized = bool(args.get("pred_z_score")), bool(args.get("factorized"))
    if z and factorized:
        return True, 1.0
    if z:
        raise CheckpointError(f"{folder}: recon with pred_z_score and factorized false cannot generate "
                              "adapters (upstream's gen_lora raises NotImplementedError for it)")
    if factorized:
        raise CheckpointError(f"{folder}: recon with factorized true and pred_z_score false is not supported: "
                              "upstream's arithmetic for it has not been checked here")
    scaling = float(args.get("delta_w_scaling", 100))
    if not (math.isfinite(scaling) and scaling > 0):
        raise CheckpointError(f"{folder}: delta_w_scaling {scaling} must be a positive number")
    return False, 1.0 / math.sqrt(scaling)


def _rename(state: dict[str, torch.Tensor], z_score: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(RECON_KEYS) and not z_score:
            continue  # present in every upstream folder; used only by z-scored recon
        for theirs, mine in KEYS:
            if key.startswith(theirs):
                key = mine + key[len(theirs):]
                break
        out[key] = value
    return out


def _embedder_kind(name: str, folder: Path) -> tuple[str, str]:
    """(pooling, dtype) upstream uses for its embedder ``name``: CLS in float32 for gte, last token in
    bfloat16 for SFR. Others (and the base LLM as embedder, an empty name) are refused."""
    low = name.lower()
    if "gte" in low:
        return "cls", "float32"
    if "sfr" in low:
        return "last", "bfloat16"
    raise CheckpointError(f"{folder}: emb_model {name!r} is not supported; gte (CLS pooling) and SFR "
                          "(last-token pooling) embedders are")
