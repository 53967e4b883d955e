"""Hypernetworks that turn a description embedding into LoRA weights (plain PyTorch, no vLLM).

Read top to bottom: the base model's shapes, the config, the shared trunk, then the five output
variants. Every variant returns the same thing, a ``LoRABatch``: for each target module,
``A [N, L, r, in]`` and ``B [N, L, out, r]`` for N descriptions and L layers.

Variants
- ``t2l-L``: one head per module emits a whole (A, B) pair for a (layer, module) row.
- ``t2l-M``: the head emits one matrix per call; a per-module A/B selector embedding is added to the trunk.
- ``t2l-S``: the head emits one rank-row of A or one rank-column of B per call; the rank index is
  encoded with fixed sinusoids.

The t2l-* variants are wired exactly as the published Text-to-LoRA code is (so its checkpoints import
one to one): the mixer and every trunk block end with SiLU, the mixer has no residual, the last block
(``to_head``) has none either, and per-layer ``AB_offset`` tensors are added to the reshaped A and B.
Zhyper keeps its own wiring (mixer with a residual, blocks ending in a Linear), which ``FoldedCodes``
relies on.
- ``zhyper-diag`` / ``zhyper-square``: the head emits only a code z (r) or Z (r x r); one LoRA pair
  per (layer, module) is shared by all descriptions and learned with the hypernetwork:
  dW = s * B diag(z) A (or s * B Z A). dW is linear in the code, so mixing codes mixes dW exactly.
- ``follow`` (zhyper-diag): a second Zhyper network of the same rank whose adapter is added (S - 1) times at
  strength S. Strength 1 is then exactly the first network's adapter (the faithful alignment prompt), and the
  served adapter is one rank-2r Zhyper adapter with the two bases side by side.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

Arch = Literal["t2l-L", "t2l-M", "t2l-S", "zhyper-diag", "zhyper-square"]
ARCHS: tuple[str, ...] = ("t2l-L", "t2l-M", "t2l-S", "zhyper-diag", "zhyper-square")

# Where each projection lives inside a Llama/Mistral/Gemma/Qwen decoder layer.
MODULE_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}

LoRABatch = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class BaseShapes:
    """What a hypernetwork must know about the base model: read from config.json, never the weights."""

    name: str
    n_layers: int
    modules: dict[str, tuple[int, int]]  # module -> (in_features, out_features)

    @classmethod
    def from_config(cls, config: dict | str | Path, target_modules: tuple[str, ...],
                    name: str | None = None) -> BaseShapes:
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text())
        cfg = config.get("text_config", config)
        try:
            hidden, heads, inter = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
            n_layers = cfg["num_hidden_layers"]
        except KeyError as e:
            raise ValueError(f"the base model's config.json lacks {e}") from None
        head_dim = cfg.get("head_dim") or hidden // heads
        kv = cfg.get("num_key_value_heads", heads) * head_dim
        sizes = {
            "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
        }
        unknown = [m for m in target_modules if m not in sizes]
        if unknown:
            raise ValueError(f"unsupported target modules {unknown}; supported: {sorted(sizes)}")
        return cls(
            name=name or cfg.get("_name_or_path") or "unknown",
            n_layers=n_layers,
            modules={m: sizes[m] for m in target_modules},
        )

    def to_dict(self) -> dict:
        return {"name": self.name, "n_layers": self.n_layers,
                "modules": {m: list(s) for m, s in self.modules.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> BaseShapes:
        return cls(d["name"], d["n_layers"], {m: tuple(s) for m, s in d["modules"].items()})

    def differences(self, other: BaseShapes) -> list[str]:
        """Human-readable list of shape mismatches (empty when compatible)."""
        out = []
        if self.n_layers != other.n_layers:
            out.append(f"layers: {self.n_layers} vs {other.n_layers}")
        for m in sorted(set(self.modules) | set(other.modules)):
            a, b = self.modules.get(m), other.modules.get(m)
            if a != b:
                out.append(f"{m} (in, out): {a} vs {b}")
        return out


@dataclass
class HyperConfig:
    """Architecture and LoRA settings; saved in every checkpoint and applied to every adapter."""

    arch: Arch = "t2l-L"
    emb_dim: int = 384
    latent: int = 128
    head_in: int = 512
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = True
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    head_bias: bool = True  # published T2L folders trained on top of a multi-task LoRA have heads without bias
    z_score: bool = False  # t2l-L/M: A and B are predicted as z-scores of per-layer targets (upstream recon)
    follow: bool = False  # zhyper-diag: a second network whose adapter is added (S - 1) times at strength S
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {ARCHS}")
        if self.latent % 4:
            raise ValueError("latent must be divisible by 4")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.follow and self.arch != "zhyper-diag":
            raise ValueError("a follow network applies to zhyper-diag only")

    @property
    def served_rank(self) -> int:
        """Largest rank of a served Zhyper adapter: a follow network's basis sits beside the first."""
        return 2 * self.rank if self.follow else self.rank

    def alpha_for(self, rank: int) -> float:
        """The alpha that gives a served adapter of ``rank`` the scale per rank training used (``scaling``)."""
        ratio = rank / self.rank
        return self.alpha * (math.sqrt(ratio) if self.use_rslora else ratio)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def _mlp(d_in: int, d_hidden: int, d_out: int, dropout: float, silu_out: bool = False) -> nn.Sequential:
    """LayerNorm, Linear, SiLU, Dropout, Linear (and a last SiLU in the T2L wiring: parameter-free, so the
    state dict's keys are the same either way)."""
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_hidden), nn.SiLU(),
                         nn.Dropout(dropout), nn.Linear(d_hidden, d_out), *([nn.SiLU()] if silu_out else []))


class Residual(nn.Module):
    def __init__(self, d: int, dropout: float, silu_out: bool = False):
        super().__init__()
        self.mlp = _mlp(d, 4 * d, d, dropout, silu_out)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class Buffers(nn.Module):
    """Fixed tensors by module name, saved in the state dict as ``<owner>.<module>`` but never trained."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(name, value)

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, name)


def _per_layer(shapes: BaseShapes, modules: list[str], rank: int, fill: float) -> nn.ModuleDict:
    """``{A: {module: [L, r, in]}, B: {module: [L, out, r]}}`` filled with ``fill``."""
    L = shapes.n_layers
    return nn.ModuleDict({
        "A": Buffers({m: torch.full((L, rank, shapes.modules[m][0]), fill) for m in modules}),
        "B": Buffers({m: torch.full((L, shapes.modules[m][1], rank), fill) for m in modules}),
    })


def sinusoid(n: int, d: int) -> Tensor:
    """Fixed position code for rank indices (t2l-S): rows are distinguishable and need no training."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    out = torch.zeros(n, d)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return out


class HyperNet(nn.Module):
    """Description embedding(s) -> LoRA weights for every (layer, target module), in one pass."""

    def __init__(self, config: HyperConfig, shapes: BaseShapes):
        super().__init__()
        c = self.config = config
        self.shapes = shapes
        missing = [m for m in c.target_modules if m not in shapes.modules]
        if missing:
            raise ValueError(f"base shapes lack target modules {missing}")
        self.modules_ = list(c.target_modules)
        L, r, m, q = shapes.n_layers, c.rank, c.latent, c.latent // 4

        # Conditioning: description, layer index, module type -> one latent vector per row.
        self.task_encoder = nn.Sequential(nn.Linear(c.emb_dim, m // 2), nn.LayerNorm(m // 2))
        self.layer_encoder = nn.Sequential(nn.Embedding(L, q), nn.LayerNorm(q))
        self.module_encoder = nn.Sequential(nn.Embedding(len(self.modules_), q), nn.LayerNorm(q))

        # Trunk.
        t2l = self.t2l_wiring = c.arch.startswith("t2l")
        self.mixer = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(m, 4 * m), nn.SiLU(),
                                   nn.Dropout(c.dropout), nn.Linear(4 * m, m), *([nn.SiLU()] if t2l else []))
        self.block1 = Residual(m, c.dropout, t2l)
        self.block2 = Residual(m, c.dropout, t2l)
        self.to_head = _mlp(m, 4 * m, c.head_in, c.dropout, t2l)

        # Variant-specific pieces.
        if c.arch == "t2l-M":  # one A and one B selector per module, through one shared LayerNorm
            self.out_emb = nn.ModuleDict({mod: nn.ParameterDict({"A": nn.Parameter(torch.randn(m) * 0.02),
                                                                 "B": nn.Parameter(torch.randn(m) * 0.02)})
                                          for mod in self.modules_})
            self.out_emb_norm = nn.LayerNorm(m)
        if c.arch == "t2l-S":
            self.register_buffer("rank_code", sinusoid(r, m), persistent=False)
            self.ab_emb = nn.Parameter(torch.randn(2, m) * 0.02)
        if c.z_score and c.arch not in ("t2l-L", "t2l-M"):
            raise ValueError("z_score applies to t2l-L and t2l-M only")
        if not c.head_bias and c.arch not in ("t2l-L", "t2l-M"):
            raise ValueError("heads without bias apply to t2l-L and t2l-M only")
        self.heads = nn.ModuleDict({mod: nn.Linear(c.head_in, self._head_out(mod), bias=c.head_bias)
                                    for mod in self.modules_})
        if c.arch in ("t2l-L", "t2l-M"):
            self.AB_offset = _per_layer(shapes, self.modules_, r, 0.0)
            if c.z_score:
                self.mean_recon_target = _per_layer(shapes, self.modules_, r, 0.0)
                self.std_recon_target = _per_layer(shapes, self.modules_, r, 1.0)
        if c.arch.startswith("zhyper"):
            self.shared_A = nn.ParameterDict({mod: nn.Parameter(torch.empty(L, r, shapes.modules[mod][0]))
                                              for mod in self.modules_})
            self.shared_B = nn.ParameterDict({mod: nn.Parameter(torch.zeros(L, shapes.modules[mod][1], r))
                                              for mod in self.modules_})
        self.follow = HyperNet(replace(c, follow=False), shapes) if c.follow else None
        self.reset_heads()

    def first_network(self) -> HyperNet:
        """This network without its follow network: what a follow checkpoint serves at strength 1."""
        first = HyperNet(replace(self.config, follow=False), self.shapes)
        first.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("follow.")})
        return first.eval()

    def _head_out(self, mod: str) -> int:
        d_in, d_out = self.shapes.modules[mod]
        r = self.config.rank
        return {"t2l-L": r * d_in + d_out * r, "t2l-M": r * max(d_in, d_out),
                "t2l-S": max(d_in, d_out), "zhyper-diag": r, "zhyper-square": r * r}[self.config.arch]

    def _offset_shape(self, mod: str) -> tuple[int, ...]:
        n = self._head_out(mod)
        return (2, self.config.rank, n) if self.config.arch == "t2l-S" else (n,)

    @torch.no_grad()
    def reset_heads(self) -> None:
        """Start from a standard LoRA init: zero head weights, a fixed offset that emits A random, B = 0.

        Step 0 of training is then an ordinary LoRA fine-tune and every adapter starts as a no-op.
        The offset is a buffer (saved, not trained): for t2l-L/M it is upstream's per-layer ``AB_offset``
        (A random per layer, B zero), for t2l-S and Zhyper one flat offset on the head's output.
        """
        r, arch = self.config.rank, self.config.arch
        for mod, head in self.heads.items():
            d_in, _ = self.shapes.modules[mod]
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
            if arch in ("t2l-L", "t2l-M"):
                for i in range(self.shapes.n_layers):
                    nn.init.kaiming_uniform_(self.AB_offset["A"][mod][i], a=math.sqrt(5))
                self.AB_offset["B"][mod].zero_()
                continue
            a = torch.empty(r, d_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            off = torch.zeros(self._offset_shape(mod))
            if arch == "t2l-S":
                off[0, :, :d_in] = a
            elif arch == "zhyper-diag":
                off[:] = 1.0
            else:
                off[:] = torch.eye(r).flatten()
            self.register_buffer(f"offset_{mod}", off)
            if arch.startswith("zhyper"):
                for i in range(self.shapes.n_layers):
                    nn.init.kaiming_uniform_(self.shared_A[mod][i], a=math.sqrt(5))
                self.shared_B[mod].zero_()

    def _head(self, mod: str, h: Tensor) -> Tensor:
        y = self.heads[mod](h)
        return y if self.config.arch in ("t2l-L", "t2l-M") else y + getattr(self, f"offset_{mod}")

    # ---- forward -------------------------------------------------------------------------

    def _rows(self, device: torch.device) -> Tensor:
        """[L, M, latent/2]: each (layer, module) row's code, the part of the trunk input no description changes."""
        L, M = self.shapes.n_layers, len(self.modules_)
        layer = self.layer_encoder(torch.arange(L, device=device))[:, None, :].expand(L, M, -1)
        module = self.module_encoder(torch.arange(M, device=device))[None, :, :].expand(L, M, -1)
        return torch.cat([layer, module], dim=-1)

    def _trunk_in(self, emb: Tensor) -> Tensor:
        """[N, emb_dim] -> [N, L, M, latent]: every (description, layer, module) row."""
        rows = self._rows(emb.device)
        n, (L, M, _) = emb.shape[0], rows.shape
        task = self.task_encoder(emb)[:, None, None, :].expand(n, L, M, -1)
        x = torch.cat([task, rows.expand(n, L, M, -1)], dim=-1)
        return self.block1(self.mixer(x) if self.t2l_wiring else x + self.mixer(x))

    def forward(self, emb: Tensor) -> LoRABatch:
        if self.config.arch.startswith("zhyper"):
            return self.from_codes(self.at_strength(self.codes(emb), 1.0))
        x = self._trunk_in(emb)
        arch, r = self.config.arch, self.config.rank
        if arch == "t2l-M":  # [N, L, M, 2, latent]: one call for A, one for B, with the module's selectors
            sel = torch.stack([torch.stack([self.out_emb[mod]["A"], self.out_emb[mod]["B"]])
                               for mod in self.modules_])
            x = x[..., None, :] + self.out_emb_norm(sel)
        elif arch == "t2l-S":  # [N, L, M, 2, r, latent]: one call per rank index, for A and for B
            x = x[..., None, None, :] + self.ab_emb[:, None, :] + self.rank_code
        h = self.to_head(self.block2(x))
        out: LoRABatch = {}
        for j, mod in enumerate(self.modules_):
            d_in, d_out = self.shapes.modules[mod]
            y = self._head(mod, h[:, :, j])
            if arch == "t2l-L":  # A row-major [r, in], then B laid out [r, out]
                A = y[..., : r * d_in].unflatten(-1, (r, d_in))
                B = y[..., r * d_in:].unflatten(-1, (r, d_out)).transpose(-1, -2)
            elif arch == "t2l-M":  # each call [r, max(in, out)]: a per-rank slice of its first in / out columns
                y = y.unflatten(-1, (r, max(d_in, d_out)))
                A = y[..., 0, :, :d_in]
                B = y[..., 1, :, :d_out].transpose(-1, -2)
            else:  # t2l-S: rows of A, columns of B
                A = y[..., 0, :, :d_in]
                B = y[..., 1, :, :d_out].transpose(-1, -2)
            if arch in ("t2l-L", "t2l-M"):
                A, B = self._per_layer_out(mod, A, B)
            out[mod] = (A, B)
        return out

    def _per_layer_out(self, mod: str, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """Upstream's last step: un-z-score against per-layer targets (recon), then add the per-layer offset."""
        if self.config.z_score:
            mean, std = self.mean_recon_target, self.std_recon_target
            A = A * (std["A"][mod] + 1e-10) + mean["A"][mod]
            B = B * (std["B"][mod] + 1e-10) + mean["B"][mod]
        return A + self.AB_offset["A"][mod], B + self.AB_offset["B"][mod]

    def codes(self, emb: Tensor) -> dict[str, Tensor]:
        """Zhyper only: per-module codes [N, L, r] (diag) or [N, L, r, r] (square); with a follow
        network, [N, L, 2r]: its codes after the first network's, before any strength (``at_strength``)."""
        if not self.config.arch.startswith("zhyper"):
            raise ValueError(f"{self.config.arch} has no codes; only zhyper-* do")
        h = self.to_head(self.block2(self._trunk_in(emb)))
        r = self.config.rank
        out = {}
        for j, mod in enumerate(self.modules_):
            z = self._head(mod, h[:, :, j])
            out[mod] = z if self.config.arch == "zhyper-diag" else z.unflatten(-1, (r, r))
        if self.follow is not None:
            out = {mod: torch.cat([z, g], -1) for (mod, z), g in zip(out.items(), self.follow.codes(emb).values())}
        return out

    def at_strength(self, codes: dict[str, Tensor], strength: Tensor | float) -> dict[str, Tensor]:
        """Codes of the adapter served at ``strength`` (a number, or one per row [N]): the codes scaled, or
        with a follow network the first network's codes kept and the follow codes scaled by S - 1; at a
        strength of exactly 1 only the first network's, so that adapter costs what it did without one."""
        if self.config.follow and not isinstance(strength, Tensor) and strength == 1:
            return {mod: z[..., :self.config.rank] for mod, z in codes.items()}
        s = torch.as_tensor(strength, dtype=next(iter(codes.values())).dtype)
        s = s.reshape(-1, *[1] * (next(iter(codes.values())).dim() - 1)) if s.dim() else s
        if not self.config.follow:
            return {mod: s * z for mod, z in codes.items()}
        r = self.config.rank
        return {mod: torch.cat([z[..., :r], (s - 1) * z[..., r:]], -1) for mod, z in codes.items()}

    def basis(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Zhyper's shared A [L, R, in] and B [L, out, R] per module, a follow network's beside the first's."""
        out = {mod: (self.shared_A[mod], self.shared_B[mod]) for mod in self.modules_}
        if self.follow is not None:
            out = {mod: (torch.cat([A, self.follow.shared_A[mod]], 1), torch.cat([B, self.follow.shared_B[mod]], -1))
                   for mod, (A, B) in out.items()}
        return out

    def from_codes(self, codes: dict[str, Tensor]) -> LoRABatch:
        """Zhyper codes -> exportable (A, B): A = diag(z) A_shared (or Z A_shared), B = B_shared, with as
        many of the basis's ranks as the codes have (``at_strength`` drops an idle follow network's)."""
        out: LoRABatch = {}
        basis = self.basis()
        for mod, z in codes.items():
            B = basis[mod][1][..., :z.shape[-1]]
            out[mod] = (expand_codes(z, basis[mod][0]), B.expand(z.shape[0], *B.shape))
        return out


def expand_codes(z: Tensor, shared_A: Tensor, out: Tensor | None = None) -> Tensor:
    """Zhyper's A for codes ``z``: diag(z) A_shared for [N, L, r] codes, Z A_shared for [N, L, r, r]; a
    basis with more ranks than the codes (an idle follow network's) gives its first ones. ``out``: a
    tensor of the result's shape to write into (a worker reusing its buffers)."""
    if z.dim() == 3:
        return torch.mul(z[..., None], shared_A[..., :z.shape[-1], :], out=out)
    return torch.matmul(z, shared_A, out=out)


class FoldedCodes(nn.Module):
    """Zhyper codes for serving: ``net.codes`` with the linear algebra that does not depend on the
    description done once, at construction.

    A cold miss pays for every FLOP here, and two pieces of ``codes`` are wasted work at inference:
    the mixer's first layer sees [task, layer, module], of which only the task part varies, and the
    last layer of ``to_head`` feeds a linear head with nothing in between, so the two fold into one
    [r, 4 * latent] matrix per module. The result equals ``net.codes`` up to float rounding; it
    snapshots the weights, so build a new one after training the network further.
    """

    def __init__(self, net: HyperNet):
        super().__init__()
        c = net.config
        if not c.arch.startswith("zhyper"):
            raise ValueError(f"{c.arch} has no codes; only zhyper-* do")
        self.square, self.rank, self.modules_ = c.arch == "zhyper-square", c.rank, net.modules_
        self.task_encoder, self.block1, self.block2 = net.task_encoder, net.block1, net.block2
        with torch.no_grad():
            fixed = net._rows(net.task_encoder[0].weight.device)
            mix_in, mix_out = net.mixer[1], net.mixer[4]
            task_dim = c.latent // 2
            self.register_buffer("fixed", fixed)
            self.register_buffer("mix_task_w", mix_in.weight[:, :task_dim].clone())
            self.register_buffer("mix_fixed", fixed @ mix_in.weight[:, task_dim:].T + mix_in.bias)
            self.mix_out = mix_out
            self.head_in = net.to_head[:3]  # LayerNorm, Linear, SiLU; the last Linear is folded below
            last = net.to_head[4]
            heads = [net.heads[m] for m in net.modules_]
            offsets = [getattr(net, f"offset_{m}") for m in net.modules_]
            self.register_buffer("head_w", torch.stack([h.weight @ last.weight for h in heads]))  # [M, k, 4m]
            self.register_buffer("head_b", torch.stack(
                [h.weight @ last.bias + h.bias + off for h, off in zip(heads, offsets)]))  # [M, k]
        self.follow = FoldedCodes(net.follow) if net.follow is not None else None

    @torch.no_grad()
    def forward(self, emb: Tensor, follow: bool = True) -> dict[str, Tensor]:
        """[N, emb_dim] -> per-module codes [N, L, r] (diag) or [N, L, r, r] (square), as ``HyperNet.codes``;
        ``follow=False`` leaves a follow network out (its codes would be multiplied by 0)."""
        task = self.task_encoder(emb)  # [N, latent/2]
        n, (L, M, _) = task.shape[0], self.fixed.shape
        x = torch.cat([task[:, None, None, :].expand(n, L, M, -1), self.fixed.expand(n, L, M, -1)], dim=-1)
        hidden = nn.functional.silu((task @ self.mix_task_w.T)[:, None, None, :] + self.mix_fixed)
        x = self.block2(self.block1(x + self.mix_out(hidden)))
        z = torch.einsum("nlmh,mkh->nlmk", self.head_in(x), self.head_w) + self.head_b
        if self.follow is not None and follow:
            z = torch.cat([z, torch.stack(list(self.follow(emb).values()), 2)], -1)
        return {mod: z[:, :, j].unflatten(-1, (self.rank, self.rank)) if self.square else z[:, :, j]
                for j, mod in enumerate(self.modules_)}
