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


# ---- errors: one line, exit code 2, for every subcommand -----------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["serve", "--checkpoint", "{tmp}"], "config.json is missing"),
    (["prepare", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--description", "x", "--checkpoint", "{tmp}", "--out", "{tmp}/o"], "config.json is missing"),
    (["generate", "--description", "x", "--weights", "1,a", "--out", "{tmp}/o"], "--weights '1,a'"),
    (["generate", "--out", "{tmp}/o"], "required: --description"),
    (["init", "--arch", "t2l-XL", "--out", "{tmp}/o"], "unknown arch 't2l-XL'"),
    (["init", "--base-model", "{tmp}/nope", "--out", "{tmp}/o"], "No such file"),
    (["init", "--base-model", "{tmp}/bad.json", "--out", "{tmp}/o"], "lacks 'hidden_size'"),
    (["import-t2l", "{tmp}/nope", "--base-config", "{tmp}", "--out", "{tmp}/o"], "is not a folder"),
    (["import-t2l", "{tmp}", "--base-config", "{tmp}", "--out", "{tmp}/o"], "lacks args.yaml"),
    (["train", "--embedder", "{tmp}/nope", "--out", "{tmp}/o"], "not found"),
    (["eval", "--checkpoint", "{tmp}", "--out", "{tmp}/o"], "config.json is missing"),
    (["bogus"], "invalid choice"),
])
def test_errors_are_one_line_and_exit_2(argv, match, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and match in err, err


FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "t2l-upstream"


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"upstream fixtures not found at {FIXTURES}")
def test_import_t2l_command(tmp_path):
    """As a user runs it: a published folder imports, the order used is printed; a refusal is one line."""
    import json
    import subprocess
    import sys

    run = [sys.executable, "-m", "vllm_t2l.cli", "import-t2l", "--base-config", str(FIXTURES / "tiny-llama")]
    ok = subprocess.run(run + [str(FIXTURES / "L_all7"), "--out", str(tmp_path / "c")], capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "module order o_proj,gate_proj,k_proj,up_proj,down_proj,v_proj,q_proj" in ok.stdout
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    assert meta["hypernet"]["target_modules"][:3] == ["o_proj", "gate_proj", "k_proj"]
    bad = subprocess.run(run + [str(FIXTURES / "L_all7"), "--module-order", "q_proj,k_proj", "--out",
                                str(tmp_path / "d")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and not (tmp_path / "d").exists()
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--module-order q_proj,k_proj is not an order" in lines[0], bad.stderr


def test_serve_passes_the_embedder_code_opt_in(no_prepare, tiny_checkpoint):
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert "VLLM_T2L_TRUST_EMBEDDER_CODE" not in env or env["VLLM_T2L_TRUST_EMBEDDER_CODE"] != "1"
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None, trust_embedder_code=True)
    assert env["VLLM_T2L_TRUST_EMBEDDER_CODE"] == "1"


def test_serve_caps_glibc_heaps_unless_the_user_set_it(no_prepare, tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert env["MALLOC_ARENA_MAX"] == "2"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert env["MALLOC_ARENA_MAX"] == "8"


@pytest.fixture
def cpu_with_jemalloc(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(cli.ctypes.util, "find_library",
                        lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    for key in ("LD_PRELOAD", "VLLM_T2L_JEMALLOC"):
        monkeypatch.delenv(key, raising=False)


def test_serve_preloads_jemalloc_on_cpu(no_prepare, tiny_checkpoint, cpu_with_jemalloc, monkeypatch):
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert env["LD_PRELOAD"] == "libjemalloc.so.2"
    monkeypatch.setenv("LD_PRELOAD", "/opt/libtrace.so")
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert env["LD_PRELOAD"] == "libjemalloc.so.2:/opt/libtrace.so"


def test_serve_keeps_the_users_malloc_or_opt_out(no_prepare, tiny_checkpoint, cpu_with_jemalloc, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4")
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert env["LD_PRELOAD"] == "/usr/lib/libtcmalloc_minimal.so.4"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("VLLM_T2L_JEMALLOC", "0")
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert "LD_PRELOAD" not in env


def test_serve_without_jemalloc_leaves_the_preload_alone(no_prepare, tiny_checkpoint, cpu_with_jemalloc,
                                                         monkeypatch):
    monkeypatch.setattr(cli.ctypes.util, "find_library", lambda name: None)
    _, env = cli.serve_command([], str(tiny_checkpoint), None, None)
    assert "LD_PRELOAD" not in env and env["MALLOC_ARENA_MAX"] == "2"
