"""Tests for vllm_t2l.serving.resolver.Settings: the VLLM_T2L_* environment knobs."""

from __future__ import annotations

from dataclasses import fields

import pytest

from vllm_t2l.names import AdapterNameError, NameLimits, parse
from vllm_t2l.serving.resolver import Settings


def test_defaults_from_empty_env():
    s = Settings.from_env({})
    assert s == Settings()
    assert s.checkpoint == "" and s.cache_max_adapters == 256 and s.cache_max_bytes == 2 << 30
    assert s.cache_grace_s == 60.0 and s.max_batch == 64 and s.device == "" and s.cpu_threads == 1


def test_parses_every_kind():
    env = {
        "VLLM_T2L_CHECKPOINT": "/ckpt/x",
        "VLLM_T2L_EMBEDDER": "/models/minilm",
        "VLLM_T2L_CATALOG": "/etc/catalog.json",
        "VLLM_T2L_CACHE_DIR": "/var/cache/t2l",
        "VLLM_T2L_CACHE_MAX_ADAPTERS": "12",
        "VLLM_T2L_CACHE_MAX_BYTES": "1048576",
        "VLLM_T2L_CACHE_GRACE_S": "2.5",
        "VLLM_T2L_MAX_CHARS": " 300 ",
        "VLLM_T2L_MAX_TERMS": "3",
        "VLLM_T2L_MAX_ABS_WEIGHT": "1",
        "VLLM_T2L_MAX_BATCH": "7",
        "VLLM_T2L_DEVICE": "cpu",
        "VLLM_T2L_CPU_THREADS": "0",
        "VLLM_T2L_UNRELATED": "ignored",
        "CACHE_MAX_ADAPTERS": "99",
    }
    s = Settings.from_env(env)
    assert s == Settings(checkpoint="/ckpt/x", embedder="/models/minilm", catalog="/etc/catalog.json",
                         cache_dir="/var/cache/t2l", cache_max_adapters=12, cache_max_bytes=1048576,
                         cache_grace_s=2.5, max_chars=300, max_terms=3, max_abs_weight=1.0, max_batch=7,
                         device="cpu", cpu_threads=0)
    assert type(s.cache_max_adapters) is int and type(s.cache_grace_s) is float
    assert type(s.max_abs_weight) is float


def test_every_field_has_a_variable():
    # each field is reachable through its variable: set them all to a valid value of their type
    samples = {int: ("5", 5), float: ("0.5", 0.5), str: ("x", "x"), bool: ("1", True)}
    env = {f"VLLM_T2L_{f.name.upper()}": samples[type(getattr(Settings, f.name))][0] for f in fields(Settings)}
    s = Settings.from_env(env)
    for f in fields(Settings):
        assert getattr(s, f.name) == samples[type(getattr(Settings, f.name))][1]


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), ("on", True), ("0", False), ("false", False),
                                        ("", False), ("No", False)])
def test_switches_read_on_and_off(raw, value):
    """bool("0") is True: a switch reads its words, not Python's truthiness."""
    assert Settings.from_env({"VLLM_T2L_TRUST_EMBEDDER_CODE": raw}).trust_embedder_code is value


def test_bad_switch_is_named():
    with pytest.raises(ValueError, match="VLLM_T2L_TRUST_EMBEDDER_CODE='maybe'"):
        Settings.from_env({"VLLM_T2L_TRUST_EMBEDDER_CODE": "maybe"})


def test_reads_os_environ(monkeypatch):
    monkeypatch.setenv("VLLM_T2L_MAX_TERMS", "4")
    monkeypatch.setenv("VLLM_T2L_CACHE_GRACE_S", "0")
    s = Settings.from_env()
    assert s.max_terms == 4 and s.cache_grace_s == 0.0


@pytest.mark.parametrize("var,raw,kind", [
    ("VLLM_T2L_CACHE_MAX_ADAPTERS", "many", "int"),
    ("VLLM_T2L_CACHE_MAX_ADAPTERS", "1.5", "int"),
    ("VLLM_T2L_CACHE_MAX_BYTES", "2GB", "int"),
    ("VLLM_T2L_MAX_CHARS", "", "int"),
    ("VLLM_T2L_MAX_BATCH", "0x10", "int"),
    ("VLLM_T2L_CACHE_GRACE_S", "soon", "float"),
    ("VLLM_T2L_MAX_ABS_WEIGHT", "1,5", "float"),
])
def test_bad_values_name_the_variable(var, raw, kind):
    with pytest.raises(ValueError) as e:
        Settings.from_env({var: raw})
    msg = str(e.value)
    assert var in msg and repr(raw) in msg and kind in msg


def test_limits():
    s = Settings.from_env({"VLLM_T2L_MAX_CHARS": "5", "VLLM_T2L_MAX_TERMS": "2",
                           "VLLM_T2L_MAX_ABS_WEIGHT": "0.5"})
    assert s.limits == NameLimits(max_chars=5, max_terms=2, max_abs_weight=0.5)
    with pytest.raises(AdapterNameError, match="limit is 5"):
        parse("t2l:abcdef", limits=s.limits)
    with pytest.raises(AdapterNameError, match="outside"):
        parse("t2l-mix:0.6*a", limits=s.limits)


@pytest.mark.parametrize("var", ["VLLM_T2L_MAX_ABS_WEIGHT", "VLLM_T2L_CACHE_GRACE_S"])
def test_non_finite_floats_refused(var):
    with pytest.raises(ValueError, match=var):
        Settings.from_env({var: "nan"})
