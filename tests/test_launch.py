"""Tests for vllm_t2l.launch helpers that need no server."""

from __future__ import annotations

from vllm_t2l.launch import free_port, parse_metrics

TEXT = """# HELP vllm_t2l:stage_seconds Time per stage.
# TYPE vllm_t2l:stage_seconds histogram
vllm_t2l:stage_seconds_bucket{le="0.001",stage="embed"} 0.0
vllm_t2l:stage_seconds_sum{stage="embed"} 0.0125
vllm_t2l:stage_seconds_sum{stage="write"} 0.5
vllm_t2l:cache_misses_total 3.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="t2l:Say \\"hi\\", twice.",waiting_lora_adapters=""} 1.7e9
"""


def test_parse_metrics_names_labels_values():
    samples = parse_metrics(TEXT)
    assert ("vllm_t2l:stage_seconds_sum", {"stage": "embed"}, 0.0125) in samples
    assert ("vllm_t2l:cache_misses_total", {}, 3.0) in samples
    assert ("vllm_t2l:stage_seconds_bucket", {"le": "0.001", "stage": "embed"}, 0.0) in samples
    info = next(s for s in samples if s[0] == "vllm:lora_requests_info")
    assert info[1]["running_lora_adapters"] == 't2l:Say \\"hi\\", twice.' and info[2] == 1.7e9
    assert len(samples) == 5  # comments are skipped


def test_free_port_is_usable():
    assert 1024 < free_port() < 65536
