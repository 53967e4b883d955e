"""Grouped, correct replacements for vLLM's CPU (torch) LoRA ops, and ``install()`` to use them.

Why: vLLM 0.32's CPU punica wrapper (``vllm/lora/punica_wrapper/punica_cpu.py``) calls the six
ops in ``vllm/lora/ops/torch_ops/lora_ops.py``. Those gather one full copy of the A or B matrix
per token (``weights[indices]``) and run a batched einsum, which is memory-heavy and slow. Worse,
the "no adapter" index -1 is used as a plain Python index, so it selects the LAST adapter slot:
once all ``max_loras`` slots hold adapters, a base-model request batched with adapter requests
receives the last slot's delta (the GPU Triton kernels skip -1 rows instead).

The ops here group tokens by adapter slot and run one matrix product per slot present in the
batch. Rows with index -1 get nothing: shrink ops write zeros there (as a zero adapter would) and
expand ops leave them untouched (as the Triton kernels do). Signatures, defaults and in-place
behaviour otherwise match the originals; products with a 16-bit output are computed in float32
and rounded once (the originals compute in the output dtype), so results agree to rounding.
The ops use data-dependent shapes and Python-level grouping, so they run eagerly: in a compiled
model, ``serving.compiled_lora`` calls them from inside one opaque custom op per layer.

Fixing the ops fixes every CPU LoRA path that uses -1: linear layers (``add_lora_linear``), the
LoRA lm_head (``add_lora_logits``, indexed per request by ``sampler_indices``) and embeddings
(``add_lora_embedding``; there vLLM maps -1 rows to slot 0's A rows, and only the expand op,
fixed here, keeps that from reaching the output).

``add_lora_linear`` replaces ``PunicaWrapperCPU.add_lora_linear``, which runs a shrink and an expand per
slice of a fused layer (six op calls for q/k/v); it runs the targeted slices as one adapter, and every
adapter slot of the batch in two batched products (shrink, expand).

``install()`` patches vLLM with them, only for vLLM releases verified here (``vllm.__version__``),
only on the CPU platform, and only once. Set ``VLLM_T2L_CPU_OPS=0`` to disable it (for example to
compare against upstream behaviour).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
import types
from dataclasses import dataclass

import torch

# A child of vLLM's "vllm" logger, so the line shows up with vLLM's own logging configuration.
logger = logging.getLogger("vllm.t2l.cpu_ops")

ENV_VAR = "VLLM_T2L_CPU_OPS"
# (major, minor) releases whose torch LoRA ops were read and tested against these replacements.
VERIFIED_RELEASES = {(0, 32)}
# Modules holding the ops: the definitions, the package re-export, and the CPU punica wrapper,
# which binds them with ``from vllm.lora.ops.torch_ops import ...`` at import time.
PATCH_MODULES = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)

_originals: dict[str, object] = {}  # op (or patched method) name -> vLLM's function, filled by install()


_loads = [0]  # adapters vLLM has loaded into slots in this process (see _count_loads)
_load_log: list[int | None] = []  # the slot each of the last loads wrote (None: unknown), oldest first
LOAD_LOG_MAX = 4096


def _contents(weights: torch.Tensor) -> tuple[int, int]:
    """What identifies the contents of a stacked weight tensor between two writes.

    vLLM writes adapters into slots in place (``stacked[slot].copy_(...)``), which bumps the tensor's
    version counter, unless vLLM created them in inference mode, where there is no counter. Every such
    write happens in ``LoRAModelManager.activate_adapter``, which ``install()`` makes count.
    """
    return _loads[0], -1 if weights.is_inference() else weights._version


def _written_since(seen: tuple[int, int], now: tuple[int, int]) -> set[int] | None:
    """The slots written between two ``_contents`` of one tensor, or None: rebuild everything.

    Counted loads say which slot they wrote, so a memo can refresh just those slots. vLLM writes the
    stacked tensors only in ``activate_adapter``; a write elsewhere (a test's) is seen when no load
    happened since the memo was made.
    """
    start = _loads[0] - len(_load_log)
    if seen[0] == now[0] or seen[0] < start:
        return None
    written = set(_load_log[seen[0] - start:now[0] - start])
    return None if None in written else written


def _cached(weights: torch.Tensor, key: str, make):
    """``make()``, memoised on the stacked weight tensor until its contents change."""
    contents = _contents(weights)
    memo = getattr(weights, "_vllm_t2l_memo", None)
    if memo is None or memo[0] != contents:
        memo = (contents, {})
        weights._vllm_t2l_memo = memo
    if key not in memo[1]:
        memo[1][key] = make()
    return memo[1][key]


def _all_zero(weights: torch.Tensor) -> bool:
    """Whether no slot holds a nonzero weight: true for a module the adapters do not target (the
    k slice of a fused qkv layer when adapters target q and v), whose ops can then be skipped.
    Kept per slot, so a load re-checks only the slot it wrote."""
    contents = _contents(weights)
    memo = getattr(weights, "_vllm_t2l_nonzero", None)
    if memo is None or memo[0] != contents:
        written = _written_since(memo[0], contents) if memo is not None else None
        if written is None:
            nonzero = weights.reshape(weights.shape[0], -1).any(dim=1).tolist()
        else:
            nonzero = list(memo[1])
            for slot in written:
                nonzero[slot] = bool(weights[slot].any())
        memo = (contents, nonzero)
        weights._vllm_t2l_nonzero = memo
    return not any(memo[1])


@dataclass
class _Plan:
    """How one batch's tokens map to slots; every op of every layer in a step shares it."""

    indices: torch.Tensor  # a private copy, to recognise the same batch
    order: torch.Tensor  # tokens with an adapter, stably sorted by slot
    slots: list[int]  # slots present, ascending, and their token counts
    counts: list[int]
    safe: torch.Tensor  # slot per token with -1 as 0, and a [tokens, 1] mask of the -1 rows
    none: torch.Tensor
    rows: torch.Tensor  # arange(tokens)
    slot_ids: torch.Tensor  # ``slots`` as a tensor
    _padded: tuple[int, torch.Tensor] | None = None  # memo of ``padded``

    def padded(self, per_slot: int) -> torch.Tensor | None:
        """Where each slot-sorted token sits when every slot's group is padded to ``per_slot`` rows, or
        ``None`` when the groups are already that long."""
        if all(c == per_slot for c in self.counts):
            return None
        if self._padded is None or self._padded[0] != per_slot:
            counts = torch.tensor(self.counts)
            starts = torch.cumsum(counts, 0) - counts
            group = torch.repeat_interleave(torch.arange(len(self.counts)), counts)
            within = torch.arange(int(counts.sum())) - starts[group]
            self._padded = (per_slot, group * per_slot + within)
        return self._padded[1]


_last_plan: list[_Plan] = []


def _plan(indices: torch.Tensor) -> _Plan:
    """The batch's plan, computed once per distinct index tensor content (once per model step:
    vLLM passes the same indices to all layers)."""
    if _last_plan and torch.equal(_last_plan[0].indices, indices):
        return _last_plan[0]
    sorted_indices, order = torch.sort(indices, stable=True)
    slots, counts = torch.unique_consecutive(sorted_indices, return_counts=True)
    slots, counts = slots.tolist(), counts.tolist()
    if slots and slots[0] < 0:  # -1 sorts first: drop those tokens
        order, slots, counts = order[counts[0] :], slots[1:], counts[1:]
    plan = _Plan(indices.clone(), order, slots, counts, indices.clamp(min=0), (indices < 0).unsqueeze(1),
                 torch.arange(indices.numel()), torch.tensor(slots, dtype=torch.long))
    _last_plan[:] = [plan]
    return plan


def _use_dense(plan: _Plan, slots_total: int, rank: int) -> bool:
    """Small batches with several adapters: one product over all slots beats a product per slot
    (benchmarks/results/cpu_lora_ops.md); one adapter, or many tokens: group. The dense product
    computes every slot for every token, so its cost counts the rank too. In a server with 16
    adapters in flight (one thread per worker, fused qkv at rank 16), grouping was faster. It also
    reads every slot's weights, used or not: with 4 of 16 slots in a decode batch, an engine step
    spent 2.5x as long in the dense products as in the grouped ones, so most slots must be in use."""
    used = len(plan.slots)
    return used > 1 and 2 * used >= slots_total and plan.indices.numel() * slots_total * rank <= DENSE_MAX


# At most this many (tokens x adapter slots x rank) for the dense path.
DENSE_MAX = 2048


def _dense_matmul(x: torch.Tensor, w_flat: torch.Tensor, plan: _Plan, slots: int, shrink: bool) -> torch.Tensor:
    """One product over every slot instead of one per slot; -1 rows get zeros.

    Shrink: ``w_flat = A.view(slots * r, in).T`` gives every slot's result for every token, and
    each token keeps its slot's block. Expand: each token's input is scattered into its slot's
    block of an otherwise zero row, so ``w_flat = B`` laid out as ``[slots * r, out]`` adds only
    that slot's product (the other blocks contribute exact zeros).
    """
    tokens = plan.rows.numel()
    if shrink:
        y = (x @ w_flat).view(tokens, slots, -1)[plan.rows, plan.safe]
    else:
        z = x.new_zeros(tokens, slots, x.shape[1])
        z[plan.rows, plan.safe] = x
        y = z.view(tokens, -1) @ w_flat
    return y.masked_fill_(plan.none, 0)


def _grouped_matmul(x: torch.Tensor, weights: torch.Tensor, plan: _Plan, dtype: torch.dtype):
    """``x[t] @ weights[slot(t)].T`` in ``dtype`` for every token with an adapter, one matmul
    per slot present, on the plan's slot-sorted token blocks.

    Returns ``(rows, y)``: ``y[i]`` is the result for token ``rows[i]``. ``rows`` is
    ``slice(None)`` when one slot covers the batch (no gather/scatter needed; a single row then
    broadcasts like vLLM's ops), and ``(None, None)`` means no token has an adapter.
    """
    if not plan.slots:
        return None, None
    weights_t = weights.transpose(1, 2)
    if len(plan.slots) == 1 and plan.order.numel() == plan.rows.numel():
        return slice(None), x.to(dtype) @ weights_t[plan.slots[0]].to(dtype)
    xs = x.index_select(0, plan.order).to(dtype)
    y = xs.new_empty(xs.shape[0], weights.shape[1])
    for slot, x_block, y_block in zip(plan.slots, xs.split(plan.counts), y.split(plan.counts)):
        w = weights_t[slot]
        torch.mm(x_block, w if w.dtype == dtype else w.to(dtype), out=y_block)
    return plan.order, y


def _compute_dtype(out: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit outputs: one rounding at the end, and small bf16/fp16 matmuls cost
    ~15 us each on CPU (vs ~4 us in float32). vLLM's ops compute in the output dtype instead."""
    return torch.promote_types(out.dtype, torch.float32)


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """``[slots, 1, out, in]`` or ``[slots, out, in]`` weights as ``[slots, out, in]``."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _expand(inputs, weights, out, indices, add_inputs, width=None):
    """``out[t] (+)= inputs[t] @ weights[slot, :width].T``; rows with slot -1 stay untouched."""
    if add_inputs and _all_zero(weights):
        return
    dtype = _compute_dtype(out)
    stacked = _stacked(weights)[:, :width]
    plan = _plan(indices)
    if inputs.shape[0] == indices.numel() and _use_dense(plan, stacked.shape[0], stacked.shape[2]):
        slots, n_out, rank = stacked.shape
        w_flat = _cached(weights, f"expand{width}{dtype}",
                         lambda: stacked.transpose(1, 2).reshape(slots * rank, n_out).to(dtype))
        y = _dense_matmul(inputs.to(dtype), w_flat, plan, slots, shrink=False)
        if add_inputs:
            out.add_(y)
        else:
            out.index_copy_(0, plan.order, y.index_select(0, plan.order).to(out.dtype))
        return
    rows, y = _grouped_matmul(inputs, stacked, plan, dtype)
    if rows is None:
        return
    if isinstance(rows, slice):
        out.add_(y) if add_inputs else out.copy_(y)
    elif add_inputs:
        out.index_add_(0, rows, y.to(out.dtype))
    else:
        out.index_copy_(0, rows, y.to(out.dtype))


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,  # (sic) vLLM's name; these are the A weights
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
):
    """``output[:, :r] = scaling * x @ A[slot].T`` per token; zeros for -1 tokens."""
    weights = _stacked(lora_b_weights)
    out = output_tensor[:, : weights.shape[1]]
    if _all_zero(lora_b_weights):
        out.zero_()
        return
    dtype = _compute_dtype(out)
    plan = _plan(lora_indices_tensor)
    if inputs.shape[0] == lora_indices_tensor.numel() and _use_dense(plan, weights.shape[0], weights.shape[1]):
        slots, rank, n_in = weights.shape
        w_flat = _cached(lora_b_weights, f"shrink{dtype}", lambda: weights.reshape(slots * rank, n_in).T.to(dtype))
        out.copy_(_dense_matmul(inputs.to(dtype), w_flat, plan, slots, shrink=True).mul_(scaling))
        return
    rows, y = _grouped_matmul(inputs, weights, plan, dtype)
    if isinstance(rows, slice):
        out.copy_(y.mul_(scaling))
    else:
        out.zero_()
        if rows is not None:
            out.index_copy_(0, rows, y.mul_(scaling).to(out.dtype))


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
):
    """``output[:, :c] (+)= x @ B[slot].T`` per token, ``c = min(B out, output width)``."""
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    n = output_tensor.shape[0]
    if inputs.shape[0] > n:  # vLLM keeps only the first n token rows
        inputs, lora_indices_tensor = inputs[:n], lora_indices_tensor[:n]
    _expand(inputs, lora_b_weights, output_tensor[:, :common], lora_indices_tensor, add_inputs,
            common)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    """``output[:, offset:offset+size] (+)= x @ B[slot].T`` per token."""
    out = output_tensor[:, slice_offset : slice_offset + slice_size]
    _expand(inputs, lora_b_weights, out, lora_indices_tensor, add_inputs)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
):
    """Prefill form of ``bgmv_shrink``: one index per run of ``seq_len_tensor`` tokens."""
    indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
):
    """Prefill form of ``bgmv_expand``."""
    indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
):
    """Prefill form of ``bgmv_expand_slice``."""
    indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size,
                      add_inputs)


@dataclass
class _Fused:
    """One layer's targeted slices as one adapter, laid out for batched products.

    ``a`` stacks every targeted slice's A on the rank axis, each cut to the ranks some slot uses (vLLM pads an
    adapter's rank up to ``--max-lora-rank`` with zeros, so a rank-8 adapter on a rank-16 engine would
    otherwise double the work). ``b`` is the matching block-diagonal B, transposed: ``[slots, rank, width]``
    over the output columns ``cols`` from the first targeted slice to the last, so one product writes every
    slice and an untargeted slice past the ends (k when adapters target q alone) costs nothing.
    """

    a: torch.Tensor  # [slots, sum(ranks), in]
    b: torch.Tensor  # [slots, sum(ranks), cols[1] - cols[0]]
    ranks: list[tuple[int, int]]  # each targeted slice's rank rows of ``a``
    cols: tuple[int, int]


def _used_rank(a: torch.Tensor) -> int:
    """Rows of a stacked A ``[slots, rank, in]`` up to the last one that any slot uses (at least one)."""
    used = a.reshape(a.shape[0], a.shape[1], -1).any(dim=-1).any(dim=0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 1


def _fused_weights(lora_a_stacked: tuple[torch.Tensor, ...], lora_b_stacked: tuple[torch.Tensor, ...],
                   output_slices: tuple[int, ...]) -> _Fused | None:
    """The layer's ``_Fused`` adapter, or ``None`` when no slice is targeted. Memoised on the first A tensor
    until vLLM writes into any of them; after a load that fits the same slices and ranks, only the written
    slot is refreshed."""
    versions = tuple(_contents(t) for t in (*lora_a_stacked, *lora_b_stacked))
    memo = getattr(lora_a_stacked[0], "_vllm_t2l_fused", None)
    if memo is not None and memo[0] == versions:
        return memo[2]
    keep = [i for i, a in enumerate(lora_a_stacked) if not _all_zero(a)]
    a_all = [_stacked(lora_a_stacked[i]) for i in keep]
    b_all = [_stacked(lora_b_stacked[i]) for i in keep]
    fused = None
    written = _written_since(memo[0][0], versions[0]) if memo else None  # one load log for every tensor
    if keep and memo and memo[1] == keep and written is not None:
        fused = memo[2]
        if all(not a[slot, hi - lo:].any() for slot in written for a, (lo, hi) in zip(a_all, fused.ranks)):
            for slot in written:
                _fill(fused, a_all, b_all, keep, output_slices, slot)
        else:  # a rank beyond the cut: rebuild
            fused = None
    if keep and fused is None:
        ranks = [_used_rank(a) for a in a_all]
        offsets = [sum(ranks[:j]) for j in range(len(ranks) + 1)]
        cols = (sum(output_slices[: keep[0]]), sum(output_slices[: keep[-1] + 1]))
        dtype = torch.promote_types(a_all[0].dtype, torch.float32)
        slots, n_in = a_all[0].shape[0], a_all[0].shape[2]
        fused = _Fused(a_all[0].new_empty(slots, offsets[-1], n_in, dtype=dtype),
                       a_all[0].new_zeros(slots, offsets[-1], cols[1] - cols[0], dtype=dtype),
                       list(zip(offsets, offsets[1:])), cols)
        _fill(fused, a_all, b_all, keep, output_slices, slice(None))
    lora_a_stacked[0]._vllm_t2l_fused = (versions, keep, fused)
    return fused


def _fill(fused: _Fused, a_all: list[torch.Tensor], b_all: list[torch.Tensor], keep: list[int],
          output_slices: tuple[int, ...], slots: int | slice) -> None:
    """Write ``slots`` (one slot, or ``slice(None)``) of the fused adapter from vLLM's stacked tensors."""
    fused.a[slots] = torch.cat([a[slots, : hi - lo] for a, (lo, hi) in zip(a_all, fused.ranks)], dim=-2)
    for i, b, (lo, hi) in zip(keep, b_all, fused.ranks):
        start = sum(output_slices[:i]) - fused.cols[0]
        width = min(output_slices[i], b.shape[1])
        fused.b[slots, lo:hi, start: start + width] = b[slots, :width, : hi - lo].transpose(-1, -2)


def _apply(y: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, fused: _Fused, slots: torch.Tensor | slice,
           scale: float, pick: torch.Tensor | None) -> None:
    """``y[rows] += scale * x @ A.T @ B.T`` for ``x`` laid out ``[slots, tokens per slot, in]``, in two batched
    products. ``pick`` selects the real tokens of a layout padded to equal groups (``None``: no padding)."""
    def weights(w: torch.Tensor) -> torch.Tensor:
        return w[slots] if isinstance(slots, slice) else w.index_select(0, slots)

    h = torch.bmm(x, weights(fused.a).transpose(1, 2))
    if scale != 1.0:
        h.mul_(scale)
    out = torch.bmm(h, weights(fused.b)).view(x.shape[0] * x.shape[1], -1)
    if pick is not None:
        out = out.index_select(0, pick)
    y[:, fused.cols[0]: fused.cols[1]].index_add_(0, rows, out.to(y.dtype))


def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                    lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                    *, buffer=None, **kwargs) -> None:
    """``PunicaWrapperCPU.add_lora_linear`` as a few batched products instead of ops per slice and slot.

    vLLM shrinks and expands each slice of a fused layer (q, k, v) separately, and the grouped ops above run
    one product per adapter slot: with 16 adapters in a decode batch, about 30 small products a layer, mostly
    per-call overhead on CPU. Here the tokens, sorted by slot, are laid out as ``[slots, tokens per slot, in]``
    (shorter groups padded with zero rows), so two batched products, shrink and expand, serve every slot at
    once. When padding would more than double the work (a long prompt beside a few decode tokens), each
    slot's group runs on its own instead. Rows with no adapter are never touched. ``buffer`` is not needed.
    """
    indices = self.token_lora_indices
    x2 = x.view(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    if x2.shape[0] != indices.numel() or y2.shape[1] != sum(output_slices):
        return _originals["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                             buffer=buffer, **kwargs)
    fused = _fused_weights(lora_a_stacked, lora_b_stacked, output_slices)
    plan = _plan(indices)
    if fused is None or not plan.slots:
        return
    xs = x2.index_select(0, plan.order).to(fused.a.dtype)
    per_slot = max(plan.counts)
    if len(plan.slots) * per_slot <= 2 * xs.shape[0]:
        first, last = plan.slots[0], plan.slots[-1]
        slots = slice(first, last + 1) if last - first + 1 == len(plan.slots) else plan.slot_ids
        pick = plan.padded(per_slot)
        if pick is not None:
            xs = xs.new_zeros(len(plan.slots) * per_slot, xs.shape[1]).index_copy_(0, pick, xs)
        _apply(y2, plan.order, xs.view(len(plan.slots), per_slot, -1), fused, slots, scale, pick)
        return
    for slot, rows, x_block in zip(plan.slots, plan.order.split(plan.counts), xs.split(plan.counts)):
        _apply(y2, rows, x_block.unsqueeze(0), fused, slice(slot, slot + 1), scale, None)


def _count_loads(activate_adapter):
    """``activate_adapter`` that also counts loads, so memoised weights are rebuilt after one. vLLM calls it
    every step for every adapter in the batch; it returns True only when it wrote a slot."""
    def counted(self, lora_id: int) -> bool:
        loaded = activate_adapter(self, lora_id)
        if loaded:
            ids = self.lora_index_to_id
            _load_log.append(ids.index(lora_id) if lora_id in ids else None)
            del _load_log[:-LOAD_LOG_MAX]
            _loads[0] += 1
        return loaded
    return counted


GROUPED_OPS = {f.__name__: f for f in (bgmv_shrink, bgmv_expand, bgmv_expand_slice,
                                       sgmv_shrink, sgmv_expand, sgmv_expand_slice)}


def release(version: str) -> tuple[int, int] | None:
    """``"0.32.0+cpu"`` -> ``(0, 32)``."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else None


def _params(fn) -> list[tuple[str, object]]:
    """Parameter names and defaults (annotations are strings here, objects in vLLM)."""
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def _swap(replacements: dict[int, object]) -> None:
    """Rebind every module-level name whose value is a key of ``replacements`` (by ``id``).

    Covers the known modules (imported here, so later ``from ... import`` picks up the new
    functions) and any already-loaded module that copied the functions into its namespace,
    except this one (its names must stay the grouped ops).
    """
    for name in PATCH_MODULES:
        importlib.import_module(name)
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType) or module.__name__ == __name__:
            continue
        namespace = module.__dict__
        for attr in GROUPED_OPS:
            new = replacements.get(id(namespace.get(attr)))
            if new is not None:
                namespace[attr] = new


def install() -> bool:
    """Patch vLLM's CPU LoRA ops with the grouped ones; return whether they are in use.

    A cheap no-op (returns False) when ``VLLM_T2L_CPU_OPS=0``, when the vLLM release is not in
    ``VERIFIED_RELEASES``, when not on the CPU platform, or when vLLM's op signatures differ from
    ours. Safe to call repeatedly and from every vLLM process, before the model runner exists.
    """
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    import vllm

    if release(vllm.__version__) not in VERIFIED_RELEASES:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    if _originals:
        return True
    lora_ops = importlib.import_module(PATCH_MODULES[0])
    originals = {name: getattr(lora_ops, name) for name in GROUPED_OPS}
    for name, original in originals.items():
        if _params(original) != _params(GROUPED_OPS[name]):
            logger.warning("vLLM %s: %s signature changed; not installing grouped CPU LoRA ops",
                           vllm.__version__, name)
            return False
    _swap({id(originals[name]): GROUPED_OPS[name] for name in GROUPED_OPS})
    _originals.update(originals)
    wrapper = importlib.import_module(PATCH_MODULES[2]).PunicaWrapperCPU
    _originals["add_lora_linear"] = wrapper.add_lora_linear
    wrapper.add_lora_linear = add_lora_linear
    manager = importlib.import_module("vllm.lora.model_manager").LoRAModelManager
    _originals["activate_adapter"] = manager.activate_adapter
    manager.activate_adapter = _count_loads(manager.activate_adapter)
    logger.info("vllm_t2l: installed grouped CPU LoRA ops (-1 = no adapter); %s=0 disables",
                ENV_VAR)
    return True


def uninstall() -> None:
    """Restore vLLM's original ops (for tests and A/B comparisons)."""
    if _originals:
        importlib.import_module(PATCH_MODULES[2]).PunicaWrapperCPU.add_lora_linear = _originals.pop("add_lora_linear")
        importlib.import_module("vllm.lora.model_manager").LoRAModelManager.activate_adapter = _originals.pop(
            "activate_adapter")
        _swap({id(GROUPED_OPS[name]): original for name, original in _originals.items()})
        _originals.clear()
