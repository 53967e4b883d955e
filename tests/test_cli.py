"""Tests for vllm_t2l.cli: the argv `vllm-t2l serve` hands to vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_t2l import cli
from vllm_t2l.checkpoint import CheckpointError


@pytest.fixture
def no_prepare(monkeypatch, tmp_path):
    monkeypatch.setattr("vllm_t2l.models.prepare_default_model", lambda: tmp_path / "model")
    monkeypatch.delenv("VLLM_T2L_CHECKPOINT", raising=False)


def _values(argv: list[str], flag: str) -> list[list[str]]:
    """Every value list given to ``flag`` (vLLM's parser lets the last one win)."""
    out = []
    for i, part in enumerate(argv):
        if part == flag:
            vals = []
            for v in argv[i + 1 :]:
                if v.startswith("--"):
                    break
                vals.append(v)
            out.append(vals)
    return out


def test_serve_restricts_lora_to_the_checkpoint_targets(no_prepare, tiny_checkpoint):
    argv, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert _values(argv, "--lora-target-modules") == [["q_proj", "v_proj"]]
    assert env["VLLM_T2L_CHECKPOINT"] == str(tiny_checkpoint.resolve())
    assert _values(argv, "--max-loras") == [["4"]]


def test_user_flags_win_over_defaults(no_prepare, tiny_checkpoint):
    argv, _ = cli.serve_command(["--lora-target-modules", "o_proj", "--max-loras", "8"],
                                str(tiny_checkpoint), None, None)
    assert _values(argv, "--lora-target-modules") == [["o_proj"]]
    assert _values(argv, "--max-loras") == [["8"]]


def test_broken_checkpoint_is_named(no_prepare, tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        cli.serve_command([], str(tmp_path), None, None)


def test_list_and_switch_flags_parse(monkeypatch, tmp_path):
    """Tuple fields of the train/eval configs take comma-separated lists (not one string, not its characters);
    bool fields are --name / --no-name switches."""
    seen = {}

    def fake_evaluate(cfg):
        seen["eval"] = cfg
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "quality.md").write_text("ok")

    monkeypatch.setattr("vllm_t2l.train.evaluate.evaluate", fake_evaluate)
    monkeypatch.setattr("vllm_t2l.train.loop.train", lambda cfg: seen.setdefault("train", cfg))
    cli.main(["eval", "--checkpoint", "a", "--compare", "b,c/d", "--out", str(tmp_path)])
    assert seen["eval"].compare == ("b", "c/d") and seen["eval"].compliance is True
    cli.main(["eval", "--checkpoint", "a", "--no-compliance", "--out", str(tmp_path)])
    assert seen["eval"].compliance is False
    cli.main(["train", "--target-modules", "q_proj,v_proj,", "--prompt-ids", "p1"])
    assert seen["train"].target_modules == ("q_proj", "v_proj") and seen["train"].prompt_ids == ("p1",)
