"""Safetensors files written from stacked tensors in a few calls, and read back in one.

Why: an adapter is two small tensors per module and layer (120 for the default model), and
safetensors' own save and load handle them one at a time, which a cold miss waits on twice (once to
write, once in vLLM's worker to read). The format lets the header point anywhere in the data, so a
stacked ``[layers, ...]`` tensor is written as one block and each layer is a key into it. The result
is an ordinary safetensors file: peft, safetensors and vLLM's own loader read it unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_BY_NAME = {name: (dtype, dtype.itemsize) for dtype, name in DTYPES.items()}
Alloc = Callable[[int], Tensor] | None  # bytes -> a uint8 tensor of that many; None: torch.empty


def empty(shape: Sequence[int], dtype: torch.dtype, alloc: Alloc = None) -> Tensor:
    """An uninitialised tensor; with ``alloc``, a view into the bytes it hands out. Why: a serving
    worker loads an adapter per cache miss, and fresh allocations of the same sizes, freed in another
    order, fragment its heap; handing the same buffers out again keeps its memory flat."""
    if alloc is None:
        return torch.empty(shape, dtype=dtype)
    return alloc(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def save(path: str | Path, stacks: Sequence[tuple[Sequence[str], Tensor]], metadata: dict[str, str]) -> None:
    """Write ``stack[i]`` under ``names[i]`` for every (names, stack) pair."""
    header: dict = {"__metadata__": metadata}
    blocks, offset = [], 0
    for names, stack in stacks:
        if len(names) != stack.shape[0]:
            raise ValueError(f"{len(names)} names for a stack of {stack.shape[0]}")
        stack = stack.detach().to("cpu").contiguous()
        size = stack[0].numel() * stack.element_size() if len(names) else 0
        for i, name in enumerate(names):
            header[name] = {"dtype": DTYPES[stack.dtype], "shape": list(stack.shape[1:]),
                            "data_offsets": [offset + i * size, offset + (i + 1) * size]}
        blocks.append(stack.view(-1).view(torch.uint8).numpy())
        offset += size * len(names)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data then starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for block in blocks:
            f.write(block.data)


def load(path: str | Path, alloc: Alloc = None) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, as views into one buffer read in one call; ``alloc`` gives
    that buffer (see ``empty``)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = empty((max(0, f.seek(0, 2) - 8 - n),), torch.uint8, alloc)
        f.seek(8 + n)
        if f.readinto(data.numpy()) != data.numel():
            raise ValueError(f"{path}: truncated")
    header.pop("__metadata__", None)
    runs: list[list] = []  # [dtype, shape, begin, end, names]: entries of one shape stored back to back
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        dtype, itemsize = _BY_NAME.get(info["dtype"], (None, 1))
        (begin, end), shape = info["data_offsets"], info["shape"]
        if (dtype is None or not 0 <= begin <= end <= data.numel() or begin % itemsize
                or end - begin != math.prod(shape) * itemsize):
            raise ValueError(f"{path}: bad header entry for {name!r}")
        run = runs[-1] if runs else None
        if run and run[0] == dtype and run[1] == shape and run[3] == begin and end > begin:
            run[3] = end
            run[4].append(name)
        else:
            runs.append([dtype, shape, begin, end, [name]])
    out = {}
    for dtype, shape, begin, end, names in runs:  # one view per run, split into its entries
        out.update(zip(names, data[begin:end].view(dtype).view(len(names), *shape).unbind(0)))
    return out
