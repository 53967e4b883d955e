"""Tests for vllm_t2l.models: paths of the embedded default, and the atomic one-time model preparation.

The GGUF conversion itself is replaced here by small stand-ins; the server tests run the real one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from vllm_t2l import models
from vllm_t2l.models import (
    COMPLETE,
    DEFAULT_MODEL_NAME,
    default_embedder_path,
    default_model_path,
    home,
    package_dir,
    prepare_default_model,
)


def test_home_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_T2L_HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h"
    assert default_model_path() == tmp_path / "h" / "models" / DEFAULT_MODEL_NAME


def test_home_falls_back_to_xdg_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_T2L_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert home() == tmp_path / "xdg" / "vllm-t2l"
    monkeypatch.setenv("VLLM_T2L_HOME", "")  # empty means unset
    assert home() == tmp_path / "xdg" / "vllm-t2l"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert home() == Path.home() / ".cache" / "vllm-t2l"


def test_default_model_path_root(tmp_path):
    assert default_model_path(tmp_path) == tmp_path / "models" / DEFAULT_MODEL_NAME


def test_package_dir_missing():
    with pytest.raises(FileNotFoundError, match="no_such_package_for_vllm_t2l"):
        package_dir("no_such_package_for_vllm_t2l")


def test_package_dir_found_without_import():
    import sys

    p = package_dir(models.GGUF_PACKAGE)
    assert p.is_dir() and (p / models.GGUF_FILE).exists()
    assert models.GGUF_PACKAGE not in sys.modules


def test_default_embedder_path_exists():
    p = default_embedder_path()
    assert p.is_dir()
    assert (p / "config.json").is_file() and (p / "modules.json").is_file()
    assert (p / "model.safetensors").is_file()


def test_default_checkpoint_is_packaged():
    assert (models.DEFAULT_CHECKPOINT / "config.json").is_file()
    assert (models.DEFAULT_CHECKPOINT / "hypernet.safetensors").is_file()


@pytest.mark.parametrize("folder", sorted(models.DEFAULT_CHECKPOINT.parent.iterdir()), ids=lambda p: p.name)
def test_every_packaged_checkpoint_loads_trained_for_the_embedded_model(folder):
    from vllm_t2l.checkpoint import load
    from vllm_t2l.hypernet import BaseShapes

    ckpt = load(folder)
    assert ckpt.trained
    ckpt.check_base(BaseShapes.from_config(models.prepare_default_model(), ckpt.config.target_modules))


def _leftovers(root: Path) -> list[str]:
    parent = default_model_path(root).parent
    return [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")] if parent.exists() else []


def test_failing_conversion_leaves_nothing(monkeypatch, tmp_path):
    calls = []

    def broken(folder, file, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion exploded")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion exploded"):
        prepare_default_model(tmp_path)
    assert len(calls) == 1
    assert calls[0].name.startswith(".tmp-") and calls[0].parent == default_model_path(tmp_path).parent
    assert not default_model_path(tmp_path).exists()
    assert _leftovers(tmp_path) == []


def test_successful_conversion_once(monkeypatch, tmp_path):
    calls = []

    def convert(folder, file, out):
        calls.append((folder, file))
        assert not (out / COMPLETE).exists()  # the marker comes after the conversion
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    target = prepare_default_model(tmp_path)
    assert target == default_model_path(tmp_path)
    assert (target / COMPLETE).is_file()
    assert (target / "config.json").read_text() == '{"model_type": "llama"}'
    assert calls == [(package_dir(models.GGUF_PACKAGE), models.GGUF_FILE)]
    assert _leftovers(tmp_path) == []

    def never(*a):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_gguf", never)
    assert prepare_default_model(tmp_path) == target


def test_leftover_without_marker_is_replaced(monkeypatch, tmp_path):
    target = default_model_path(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("half written")
    (target / "stale.bin").write_bytes(b"x")

    def convert(folder, file, out):
        (out / "config.json").write_text("fresh")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    assert prepare_default_model(tmp_path) == target
    assert (target / "config.json").read_text() == "fresh"
    assert not (target / "stale.bin").exists()
    assert (target / COMPLETE).is_file()
    assert _leftovers(tmp_path) == []


def test_leftover_survives_failed_retry_untrusted(monkeypatch, tmp_path):
    """A failed conversion neither trusts nor half-replaces an existing unmarked folder."""
    target = default_model_path(tmp_path)
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"x")

    def broken(folder, file, out):
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare_default_model(tmp_path)
    assert not (target / COMPLETE).exists()
    assert _leftovers(tmp_path) == []


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls = []

    def slow(folder, file, out):
        calls.append(1)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", slow)
    results, errors = [], []

    def worker():
        try:
            results.append(prepare_default_model(tmp_path))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert results == [default_model_path(tmp_path)] * 4
    assert len(calls) == 1
    assert _leftovers(tmp_path) == []
