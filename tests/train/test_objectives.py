"""Losses: the anchor's drift and the guided teacher must be the dense quantities they claim."""

from __future__ import annotations

import pytest
import torch

from vllm_t2l.train import objectives


def _batch(g: torch.Generator, n: int = 3, layers: int = 4, rank: int = 5) -> dict:
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    return {"q_proj": (r(n, layers, rank, 7), r(n, layers, 6, rank)),
            "v_proj": (r(n, layers, rank, 7), r(n, layers, 3, rank))}


def _dense(batch: dict) -> dict:
    return {m: b @ a for m, (a, b) in batch.items()}


def test_adapter_drift_is_the_relative_squared_distance_of_the_dense_updates():
    g = torch.Generator().manual_seed(0)
    pred, ref = _batch(g), _batch(g)
    dp, dr = _dense(pred), _dense(ref)
    moved = sum((dp[m] - dr[m]).pow(2).sum((-3, -2, -1)) for m in dp)
    kept = sum(dr[m].pow(2).sum((-3, -2, -1)) for m in dr)
    torch.testing.assert_close(objectives.adapter_drift(pred, ref), moved / kept)


def test_adapter_drift_is_zero_for_the_same_update_in_other_factors():
    g = torch.Generator().manual_seed(1)
    ref = _batch(g)
    scaled = {m: (2 * a, b / 2) for m, (a, b) in ref.items()}  # B A unchanged
    torch.testing.assert_close(objectives.adapter_drift(scaled, ref), torch.zeros(3, dtype=torch.float64))


def test_adapter_drift_refuses_a_reference_with_nothing_in_it():
    g = torch.Generator().manual_seed(2)
    pred = _batch(g)
    untrained = {m: (a, torch.zeros_like(b)) for m, (a, b) in _batch(g).items()}  # a fresh network's B is zero
    with pytest.raises(ValueError, match="all-zero adapter"):
        objectives.adapter_drift(pred, untrained)


def test_guided_logp_is_the_teacher_at_one_and_amplifies_beyond():
    guided_logp = objectives.guided_logp
    torch.manual_seed(0)
    full_t = torch.log_softmax(torch.randn(5, 50), -1)
    full_b = torch.log_softmax(torch.randn(5, 50), -1)
    ids = full_t.topk(50, -1).indices  # every outcome: no tail, so the result is exact CFG over the vocabulary
    t, b = full_t.gather(-1, ids), full_b.gather(-1, ids)
    torch.testing.assert_close(guided_logp(t, b, 1.0), t, atol=1e-5, rtol=0)
    expect = torch.log_softmax(full_b + 2.0 * (full_t - full_b), -1).gather(-1, ids)
    torch.testing.assert_close(guided_logp(t, b, 2.0), expect, atol=1e-5, rtol=0)
    k = 8  # with a tail bucket: still a distribution over k + 1 outcomes
    g = guided_logp(t[:, :k], b[:, :k], 2.0)
    assert torch.all(g.exp().sum(-1) <= 1 + 1e-6)
    torch.testing.assert_close(guided_logp(t[:, :k], b[:, :k], 1.0), t[:, :k], atol=1e-5, rtol=0)
