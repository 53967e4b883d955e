"""Losses for the three training modes; each takes student logits at the answer positions."""

from __future__ import annotations

import torch
from torch import Tensor


def distill_kl(logits: Tensor, top_ids: Tensor, top_logp: Tensor) -> Tensor:
    """Per-token KL(teacher || student) from the teacher's top-k plus one bucket for the rest.

    logits [K, V] (student), top_ids/top_logp [K, k] (teacher). Exact when the teacher's mass
    outside its top-k is zero; otherwise the tail is compared as a single outcome.
    """
    s_logp = torch.log_softmax(logits.float(), dim=-1)
    t_logp = top_logp.float()
    s_top = s_logp.gather(-1, top_ids.long())
    kl = (t_logp.exp() * (t_logp - s_top)).sum(-1)
    t_tail = (1 - t_logp.exp().sum(-1)).clamp_min(1e-8)
    s_tail = (1 - s_top.exp().sum(-1)).clamp_min(1e-8)
    return kl + t_tail * (t_tail.log() - s_tail.log())


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none",
                                             label_smoothing=label_smoothing)


def reconstruction(pred: dict[str, tuple[Tensor, Tensor]], target: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """L1 between generated and library A/B matrices (Text-to-LoRA's reconstruction objective)."""
    losses = [(pa - ta).abs().mean() + (pb - tb).abs().mean()
              for m in pred for (pa, pb), (ta, tb) in [(pred[m], target[m])]]
    return torch.stack(losses).mean()


def adapter_drift(pred: dict[str, tuple[Tensor, Tensor]], ref: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """Per row, ||dW_pred - dW_ref||^2 / ||dW_ref||^2 over every layer and module: how far training has moved an
    adapter from a reference network's (the anchor loss).

    Exact without forming a dense update: with U = [B, -B_ref] and V = [A; A_ref] (rank 2r),
    ||U V||^2 = sum((U^T U) * (V V^T)), two small Gram matrices per layer.
    """
    moved = kept = 0
    for m, (a, b) in pred.items():
        a_ref, b_ref = ref[m]
        u, v = torch.cat([b, -b_ref], dim=-1), torch.cat([a, a_ref], dim=-2)
        moved = moved + ((u.mT @ u) * (v @ v.mT)).sum((-3, -2, -1))
        kept = kept + ((b_ref.mT @ b_ref) * (a_ref @ a_ref.mT)).sum((-3, -2, -1))
    if (kept == 0).any():
        raise ValueError("the reference makes an all-zero adapter, so there is nothing to stay near "
                         "(an untrained --init checkpoint?)")
    return moved / kept


def guided_logp(top_logp: Tensor, base_top_logp: Tensor, guidance: float) -> Tensor:
    """The teacher's top-k log-probabilities with the prompt's effect amplified: log p ∝ l_base + g (l_prompt - l_base)
    (classifier-free guidance), over the same k outcomes plus the tail bucket, renormalised.

    top_logp [K, k] is the prompted teacher, base_top_logp [K, k] the model without the prompt at the same ids;
    g = 1 gives back ``top_logp``. The 135M base model follows many descriptions only faintly as a system prompt, and
    g ~ 2 makes its answers do what the description asks far more often.
    """
    t, b = top_logp.float(), base_top_logp.float()
    t_tail = (1 - t.exp().sum(-1, keepdim=True)).clamp_min(1e-8).log()
    b_tail = (1 - b.exp().sum(-1, keepdim=True)).clamp_min(1e-8).log()
    mixed = torch.cat([b + guidance * (t - b), b_tail + guidance * (t_tail - b_tail)], dim=-1)
    return torch.log_softmax(mixed, dim=-1)[..., :-1]
