"""Tests for vllm_t2l.serving.offline with vLLM's real offline engine and the embedded default model."""

from __future__ import annotations

from vllm_t2l.models import prepare_default_model
from vllm_t2l.serving.offline import answer


def test_a_seed_draws_the_same_answer_whatever_else_is_in_the_batch():
    """The control curves compare adapters on common random numbers: they rely on this."""
    conv = [{"role": "user", "content": "Write one sentence about the sea."}]
    sampled = answer(prepare_default_model(), [conv] * 4, 12, 1, seeds=[7, 7, 8, 9], temperature=1.0)
    assert sampled[0].token_ids == sampled[1].token_ids
    assert len({tuple(a.token_ids) for a in sampled[1:]}) > 1  # other seeds draw other answers
    assert all(a.top_ids.shape == (len(a.token_ids), 1) for a in sampled)
