"""Tests for vllm_t2l.tensorfile: files safetensors reads, and safetensors files read back in one call."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import recording
from safetensors.torch import load_file, save_file

from vllm_t2l import tensorfile


def stacks(dtype: torch.dtype) -> list:
    g = torch.Generator().manual_seed(0)
    return [([f"layers.{i}.a" for i in range(3)], torch.randn(3, 4, 5, generator=g).to(dtype)),
            ([f"layers.{i}.b" for i in range(3)], torch.randn(3, 7, generator=g).to(dtype)),
            (["scalar"], torch.randn(1, generator=g).to(dtype)),
            (["empty.0", "empty.1"], torch.empty(2, 0, 3, dtype=dtype))]


def expected(parts) -> dict[str, torch.Tensor]:
    return {name: t for names, stack in parts for name, t in zip(names, stack)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_written_files_read_by_safetensors_and_back(tmp_path, dtype):
    parts = stacks(dtype)
    tensorfile.save(tmp_path / "x.safetensors", parts, {"format": "pt"})
    for got in (load_file(tmp_path / "x.safetensors"), tensorfile.load(tmp_path / "x.safetensors")):
        want = expected(parts)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == dtype and torch.equal(got[name], want[name]), name


def test_reads_files_written_by_safetensors(tmp_path):
    want = {"b": torch.randn(3, 2), "a": torch.randn(5).to(torch.bfloat16), "c": torch.arange(4.0)}
    save_file(want, tmp_path / "x.safetensors", metadata={"k": "v"})
    got = tensorfile.load(tmp_path / "x.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_reads_into_the_buffer_it_is_handed(tmp_path):
    parts = stacks(torch.float32)
    tensorfile.save(tmp_path / "x.safetensors", parts, {"format": "pt"})
    handed = []
    got = tensorfile.load(tmp_path / "x.safetensors", recording(handed))
    want = expected(parts)
    assert len(handed) == 1 and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].untyped_storage().data_ptr() == handed[0].data_ptr()
               for k in want)


def test_non_contiguous_stacks_are_written_in_order(tmp_path):
    stack = torch.randn(4, 3).t()  # [3, 4], not contiguous
    tensorfile.save(tmp_path / "x.safetensors", [(["p", "q", "r"], stack)], {})
    got = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(got[n], stack[i]) for i, n in enumerate("pqr"))


def test_names_must_match_the_stack(tmp_path):
    with pytest.raises(ValueError, match="2 names for a stack of 3"):
        tensorfile.save(tmp_path / "x.safetensors", [(["a", "b"], torch.zeros(3, 2))], {})


def write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]},  # size disagrees with the shape
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},  # past the end of the data
    {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},  # misaligned
    {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},  # not a dtype adapters use
    {"dtype": "F32", "shape": [1]},  # no offsets
])
def test_bad_headers_are_refused(tmp_path, entry):
    write_raw(tmp_path / "x.safetensors", {"t": entry}, bytes(12))
    with pytest.raises((ValueError, KeyError)):
        tensorfile.load(tmp_path / "x.safetensors")


def test_truncated_header_is_refused(tmp_path):
    (tmp_path / "x.safetensors").write_bytes((100).to_bytes(8, "little") + b'{"t": ')
    with pytest.raises(ValueError):
        tensorfile.load(tmp_path / "x.safetensors")
