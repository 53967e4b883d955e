"""Time vLLM 0.32's CPU LoRA ops against vllm_t2l's grouped ones on SmolLM2-135M shapes.

One measured call = the LoRA work of one decoder layer's q_proj (576 -> 576) and v_proj
(576 -> 192) at rank 8: shrink into a float32 buffer, then expand_slice into the output, as
PunicaWrapperCPU.add_lora_linear does. "decode" uses the bgmv ops with adapters interleaved
token by token; "prefill" uses the sgmv ops with one adapter per request (contiguous runs).
All 16 adapter slots are filled; no token uses -1, so the implementations compute the same.
Ours are timed on both of their paths (one product per slot present, "grouped"; one product over
all slots, "dense"); ``cpu_ops.DENSE_MAX`` picks between them, and the speedup is that of the path they pick.
A second table times what vLLM actually calls per layer, ``PunicaWrapperCPU.add_lora_linear`` on the fused
qkv_proj (k untargeted): vLLM's method with vLLM's ops, with the grouped ops, and the fused method.

    python -m benchmarks.cpu_lora_ops [--threads N] [--out DIR]    # from the repo root

Times are 10th percentiles of alternating rounds, so they tolerate other load on the machine;
with other processes busy, ``--threads 1`` avoids OpenMP threads waiting on each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from vllm.lora.ops.torch_ops import lora_ops

from benchmarks import report
from vllm_t2l.serving import cpu_ops

HIDDEN, RANK, SLOTS = 576, 8, 16
MODULES = {"q_proj": 576, "v_proj": 192}
QKV = (576, 192, 192)  # the fused qkv_proj's slices
TOKENS = (16, 64, 256)
ADAPTERS = (1, 4, 16)
DTYPES = (torch.bfloat16, torch.float32)


def _mapping(tokens: int, adapters: int, path: str) -> torch.Tensor:
    if path == "decode":  # one token per request, adapters interleaved
        return (torch.arange(tokens) % adapters)[torch.randperm(tokens)]
    requests = max(adapters, 4)  # contiguous runs, one adapter per request
    return torch.arange(requests).repeat_interleave(tokens // requests) % adapters


def _layer_step(ops, path, x, weights, buffers, out, indices):
    """q_proj and v_proj LoRA for one layer: shrink, then expand_slice at each slice offset."""
    if path == "decode":
        meta = (indices,)
    else:
        idx, lens = torch.unique_consecutive(indices, return_counts=True)
        meta = (torch.cumsum(lens, 0) - lens, lens, idx, idx.numel(), int(lens.max()),
                indices.numel())
    shrink, expand = ("bgmv_shrink", "bgmv_expand_slice") if path == "decode" else (
        "sgmv_shrink", "sgmv_expand_slice")
    offset = 0
    for (a, b), buf, size in zip(weights, buffers, MODULES.values(), strict=True):
        ops[shrink](x, a, buf, *meta, 1.0)
        ops[expand](buf, b, out, *meta, offset, size, True)
        offset += size


def _forced(dense: bool | None) -> dict:
    """Our ops on one path (None: the path they pick) for the duration of each call."""
    def wrap(fn):
        def call(*args):
            saved = cpu_ops._use_dense
            if dense is not None:
                cpu_ops._use_dense = lambda *_: dense
            try:
                return fn(*args)
            finally:
                cpu_ops._use_dense = saved
        return call
    return {name: wrap(fn) for name, fn in cpu_ops.GROUPED_OPS.items()}


def _with_ops(fn, ops: dict):
    """``fn`` run with ``ops`` bound where PunicaWrapperCPU looks them up, restored after."""
    from vllm.lora.punica_wrapper import punica_cpu

    def call():
        saved = {name: getattr(punica_cpu, name) for name in ops}
        for name, op in ops.items():
            setattr(punica_cpu, name, op)
        try:
            return fn()
        finally:
            for name, op in saved.items():
                setattr(punica_cpu, name, op)
    return call


def _linear_rows(original: dict) -> list[tuple]:
    """One qkv_proj layer through ``PunicaWrapperCPU.add_lora_linear``, as vLLM calls it: vLLM's
    method with vLLM's ops, vLLM's method with the grouped ops (two op calls per slice), and the
    fused method (one shrink and one expand for all slices). Adapters target q and v; k stays zero."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    per_slice = PunicaWrapperCPU.add_lora_linear
    rows = []
    for dtype in DTYPES:
        a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN).to(dtype) for _ in QKV)
        b = tuple(torch.randn(SLOTS, 1, out, RANK).to(dtype) for out in QKV)
        a[1].zero_(), b[1].zero_()
        for path in ("decode", "prefill"):
            for tokens in TOKENS:
                for adapters in ADAPTERS:
                    ids = list(range(1, SLOTS + 1))
                    mapping = tuple(ids[int(i)] for i in _mapping(tokens, adapters, path))
                    wrapper = PunicaWrapperCPU(tokens, tokens, device="cpu")
                    wrapper.update_metadata(LoRAMapping(mapping, mapping, is_prefill=path == "prefill"), ids,
                                            SLOTS, vocab_size=100)
                    x = torch.randn(tokens, HIDDEN).to(dtype)
                    y = torch.zeros(tokens, sum(QKV), dtype=dtype)
                    calls = [partial(method, wrapper, y, x, a, b, 1.0, QKV)
                             for method in (per_slice, per_slice, cpu_ops.add_lora_linear)]
                    times = _time([_with_ops(calls[0], original), _with_ops(calls[1], cpu_ops.GROUPED_OPS),
                                   calls[2]])
                    rows.append((str(dtype).removeprefix("torch."), path, tokens, adapters,
                                 *(t * 1e3 for t in times), times[1] / times[2]))
    return rows


def _time(fns, rounds=5, seconds=0.04) -> list[float]:
    """10th-percentile seconds per call of each fn, measured in alternating rounds so that other
    load on the machine hits all of them alike (and the low percentile filters it out)."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    for _ in range(rounds):
        for fn, out in zip(fns, samples, strict=True):
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return [statistics.quantiles(s, n=10)[0] for s in samples]


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    return parser


def main() -> str:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = {name: getattr(lora_ops, name) for name in cpu_ops.GROUPED_OPS}
    rows = []
    for dtype in DTYPES:
        weights = [(torch.randn(SLOTS, 1, RANK, HIDDEN).to(dtype),
                    torch.randn(SLOTS, 1, out, RANK).to(dtype)) for out in MODULES.values()]
        for path in ("decode", "prefill"):
            for tokens in TOKENS:
                for adapters in ADAPTERS:
                    indices = _mapping(tokens, adapters, path)
                    x = torch.randn(tokens, HIDDEN).to(dtype)
                    buffers = [torch.zeros(tokens, RANK) for _ in MODULES]
                    out = torch.zeros(tokens, sum(MODULES.values()), dtype=dtype)
                    times = _time([partial(_layer_step, ops, path, x, weights, buffers, out, indices)
                                   for ops in (original, _forced(False), _forced(True), _forced(None))])
                    rows.append((str(dtype).removeprefix("torch."), path, tokens, adapters,
                                 *(t * 1e3 for t in times[:3]), times[0] / times[3]))
    linear = _linear_rows(original)
    ratios = [r[-1] for r in rows]
    fused = [r[-1] for r in linear]
    lines = [
        f"CPU LoRA ops, one layer's q_proj+v_proj (hidden {HIDDEN}, rank {RANK}, {SLOTS} slots), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| dtype | path | tokens | adapters | vLLM ms | grouped ms | dense ms | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {d} | {p} | {t} | {a} | {o:.3f} | {g:.3f} | {n:.3f} | {s:.1f}x |"
          for d, p, t, a, o, g, n, s in rows),
        "",
        f"Speedup: geometric mean {statistics.geometric_mean(ratios):.1f}x, "
        f"min {min(ratios):.1f}x, max {max(ratios):.1f}x.",
        "",
        "## One qkv_proj layer through PunicaWrapperCPU.add_lora_linear (slices 576/192/192, k untargeted)",
        "",
        "| dtype | path | tokens | adapters | vLLM ms | grouped ops, per slice ms | fused ms | fused vs per slice |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {d} | {p} | {t} | {a} | {o:.3f} | {g:.3f} | {f:.3f} | {s:.2f}x |"
          for d, p, t, a, o, g, f, s in linear),
        "",
        f"Fused vs per slice: geometric mean {statistics.geometric_mean(fused):.2f}x, "
        f"min {min(fused):.2f}x, max {max(fused):.2f}x.",
    ]
    table = "\n".join(lines) + "\n"
    keys = ("dtype", "path", "tokens", "adapters", "vllm_ms", "grouped_ms", "dense_ms", "speedup")
    linear_keys = ("dtype", "path", "tokens", "adapters", "vllm_ms", "per_slice_ms", "fused_ms", "fused_speedup")
    report.write(args.out, "cpu_lora_ops", table, {"context": report.context("benchmarks.cpu_lora_ops"),
                                                    "threads": torch.get_num_threads(),
                                                    "rows": [dict(zip(keys, r)) for r in rows],
                                                    "linear_rows": [dict(zip(linear_keys, r)) for r in linear]})
    print(table)
    return table


if __name__ == "__main__":
    main()
