"""The scale benchmark's memory slopes (the served run: `python -m benchmarks.scale`)."""

from __future__ import annotations

import random

import pytest

from benchmarks.scale import difference, markdown, slope, summarise


def samples(kib_per_name: float, n: int = 400, noise_kib: float = 50.0, seed: int = 0) -> list[dict]:
    """Memory samples every 10 names growing ``kib_per_name``, split across two processes, with noise."""
    rng = random.Random(seed)
    out = []
    for i in range(0, n * 10, 10):
        engine = 700.0 + rng.gauss(0, noise_kib) / 1024
        api = 1000.0 + i * kib_per_name / 1024
        out.append({"i": i, "rss_mb": engine + api, "rss_mb_by_process": {"engine": engine, "api": api},
                    "folders": 0, "adapters_resident": 0})
    return out


def summary(kib_per_name: float, seed: int = 0) -> dict:
    rows = [{"latency_ms": 10.0, "ttft_ms": 5.0, "error": None}] * 400
    return summarise(rows, samples(kib_per_name, seed=seed), 100)


def test_slope_finds_growth_and_calls_noise_flat():
    grows, flat = slope(samples(0.5)), slope(samples(0.0))
    assert grows["kib_per_name"] == pytest.approx(0.5, abs=0.01) and not grows["flat"]
    assert flat["flat"] and abs(flat["kib_per_name"]) < 0.05
    assert slope(samples(0.5), "engine")["flat"] and slope(samples(0.5), "api")["kib_per_name"] == pytest.approx(0.5)


def test_difference_subtracts_the_control_and_adds_the_errors():
    names, control = summary(0.8, seed=1), summary(0.5, seed=2)
    d = difference(names, control)
    a, b = names["memory_slope_last_half"], control["memory_slope_last_half"]
    assert d["total"]["kib_per_name"] == pytest.approx(a["kib_per_name"] - b["kib_per_name"])
    assert d["total"]["stderr_kib_per_name"] == pytest.approx(
        (a["stderr_kib_per_name"] ** 2 + b["stderr_kib_per_name"] ** 2) ** 0.5)
    assert not d["total"]["flat"] and d["by_process"]["api"]["kib_per_name"] == pytest.approx(0.3, abs=0.01)
    assert difference(summary(0.5, seed=3), control)["total"]["flat"]


def test_the_report_gives_the_control_and_the_difference():
    s = summary(0.8, seed=1)
    s["control"] = summary(0.5, seed=2)
    s["difference"] = difference(s, s["control"])
    ctx = {"command": "python -m benchmarks.scale --control", "date": "2026-12-06", "cpus": 2,
           "load_average_at_end": 2.0, "concurrency": 4, "allocator": "glibc defaults", "planned": 400}
    text = markdown(s, ctx, [], {})
    assert "## What a user would run instead" in text
    assert f"**{s['difference']['total']['kib_per_name']:.3f} KiB per name**" in text
    assert "not within two standard errors of zero" in text


def test_the_report_gives_plain_vllm_and_each_arm_over_it():
    s = summary(0.8, seed=1)
    s["control"] = summary(0.5, seed=2)
    s["difference"] = difference(s, s["control"])
    s["plain"] = summary(0.5, seed=3) | {"allocator": "glibc defaults"}
    s["over_plain"] = {"names": difference(s, s["plain"]), "system": difference(s["control"], s["plain"])}
    ctx = {"command": "python -m benchmarks.scale --plain", "date": "2026-12-07", "cpus": 2,
           "load_average_at_end": 2.0, "concurrency": 4, "allocator": "glibc defaults", "planned": 400}
    text = markdown(s, ctx, [], {})
    assert "## Plain vLLM" in text
    names, system = text.split("- Names minus plain vLLM: ")[1], text.split("- System prompts on this server minus "
                                                                              "plain vLLM: ")[1]
    assert names.startswith(f"**{s['over_plain']['names']['total']['kib_per_name']:.3f} KiB per request**")
    assert "not within two standard errors" in names.splitlines()[0]
    assert "within two standard errors of zero." in system.splitlines()[0]
    assert "not within" not in system.splitlines()[0]
