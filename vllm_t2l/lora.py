"""One LoRA adapter in memory: exact mixing, and PEFT folders that peft and vLLM both load."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from vllm_t2l import tensorfile
from vllm_t2l.hypernet import MODULE_PARENT

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
METADATA_FILE = "vllm_t2l.json"  # descriptions, weights, checkpoint id


@dataclass
class LoRAWeights:
    """Per target module: A [L, r, in] and B [L, out, r]; the update of layer i is s * B[i] @ A[i]."""

    A: dict[str, Tensor]
    B: dict[str, Tensor]
    alpha: float
    use_rslora: bool

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[1]

    @property
    def n_layers(self) -> int:
        return next(iter(self.A.values())).shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def delta(self, module: str, layer: int) -> Tensor:
        """Dense update [out, in] of one layer: for tests and measurements, not for serving."""
        return self.scaling * (self.B[module][layer].double() @ self.A[module][layer].double())

    def norm(self) -> float:
        """Frobenius norm of the whole update, every layer and module together: how strong an adapter is."""
        return math.sqrt(sum(self.delta(m, i).pow(2).sum().item() for m in self.A for i in range(self.n_layers)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.A.values(), *self.B.values()))

    # ---- exact mixing ----------------------------------------------------------------------

    @staticmethod
    def weighted_sum(parts: Sequence[LoRAWeights], weights: Sequence[float]) -> LoRAWeights:
        """The adapter whose update is exactly sum_i w_i * dW_i, by concatenating ranks.

        Each part's scaling and weight are folded into its A; the result has scaling 1
        (alpha = r, no rsLoRA), so no cross terms appear, unlike averaging A's and B's.
        """
        if len(parts) != len(weights) or not parts:
            raise ValueError("need one weight per adapter, and at least one adapter")
        modules = list(parts[0].A)
        if any(list(p.A) != modules for p in parts):
            raise ValueError("adapters target different modules")
        A = {m: torch.cat([w * p.scaling * p.A[m] for p, w in zip(parts, weights)], dim=1)
             for m in modules}
        B = {m: torch.cat([p.B[m] for p in parts], dim=2) for m in modules}
        rank = A[modules[0]].shape[1]
        return LoRAWeights(A, B, alpha=float(rank), use_rslora=False)

    # ---- PEFT folders ----------------------------------------------------------------------

    def _keys(self, module: str, which: str) -> list[str]:
        """PEFT's key for ``module``'s ``which`` (lora_A or lora_B) in every layer."""
        return [f"base_model.model.model.layers.{i}.{MODULE_PARENT[module]}.{module}.{which}.weight"
                for i in range(self.n_layers)]

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for m in self.A:
            out.update(zip(self._keys(m, "lora_A"), self.A[m].contiguous()))
            out.update(zip(self._keys(m, "lora_B"), self.B[m].contiguous()))
        return out

    def save_peft(self, folder: str | Path, base_model: str, metadata: dict | None = None) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (fp32) as peft does."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stacks = [(self._keys(m, "lora_A"), self.A[m].float()) for m in self.A]
        stacks += [(self._keys(m, "lora_B"), self.B[m].float()) for m in self.B]
        tensorfile.save(folder / WEIGHTS_FILE, stacks, metadata={"format": "pt"})
        write_config(folder, base_model, self.rank, self.alpha, self.use_rslora, list(self.A), metadata)
        return folder

    @classmethod
    def load_peft(cls, folder: str | Path) -> LoRAWeights:
        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(folder / WEIGHTS_FILE)
        A: dict[str, list[Tensor]] = {}
        B: dict[str, list[Tensor]] = {}
        for key in sorted(tensors, key=_layer_order):
            parts = key.split(".")
            module, which = parts[-3], parts[-2]
            (A if which == "lora_A" else B).setdefault(module, []).append(tensors[key])
        return cls({m: torch.stack(v) for m, v in A.items()}, {m: torch.stack(v) for m, v in B.items()},
                   alpha=float(config["lora_alpha"]), use_rslora=bool(config.get("use_rslora", False)))


def write_config(folder: Path, base_model: str, rank: int, alpha: float, use_rslora: bool,
                 modules: list[str], metadata: dict | None = None) -> None:
    """adapter_config.json as peft writes it, and our metadata beside it (peft warns about unknown keys)."""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora, "target_modules": sorted(modules),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if metadata:
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def _layer_order(key: str) -> tuple[int, str]:
    parts = key.split(".")
    return int(parts[parts.index("layers") + 1]), key


def from_batch(batch: dict[str, tuple[Tensor, Tensor]], index: int, alpha: float,
               use_rslora: bool) -> LoRAWeights:
    """Slice adapter ``index`` out of a hypernetwork output batch."""
    return LoRAWeights({m: a[index] for m, (a, _) in batch.items()},
                       {m: b[index] for m, (_, b) in batch.items()}, alpha, use_rslora)
