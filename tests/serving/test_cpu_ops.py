"""Tests for vllm_t2l.serving.cpu_ops: grouped CPU LoRA ops and their installation into vLLM.

Each op is checked (a) against vLLM's own torch op on mappings without -1, and (b) against a
dense per-token float64 reference written here, on mappings with -1 ("no adapter") rows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import vllm
from vllm.lora.ops.torch_ops import lora_ops
from vllm.platforms import current_platform

from vllm_t2l.serving import cpu_ops

cpu_ops.uninstall()  # in case something in this process installed them already
USE_DENSE = cpu_ops._use_dense  # the autouse fixture below replaces it
REF = {name: getattr(lora_ops, name) for name in cpu_ops.GROUPED_OPS}
assert all(f.__module__ == lora_ops.__name__ for f in REF.values())

SLOTS = 4  # max_loras
RANK, HIDDEN, OUT = 8, 48, 40
DTYPES = [torch.float32, torch.bfloat16]
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
    torch.bfloat16: {"rtol": 2e-2, "atol": 5e-2},
}

# Token -> slot mappings. Every "full" mapping uses all SLOTS slots.
NO_MINUS_ONE = {
    "one_slot": [2] * 9,
    "full_runs": [0, 0, 1, 1, 1, 2, 3, 3, 0, 0],
    "full_interleaved": [3, 0, 2, 1, 3, 0, 2, 1, 1, 3, 3],
    "single_token": [1],
}
WITH_MINUS_ONE = {
    "all_none": [-1] * 6,
    "full_and_none": [-1, 0, 0, 1, 2, 3, -1, -1, 3, 1],
    "none_first_interleaved": [-1, 3, -1, 3, 0, -1, 2, 1],
    "one_slot_and_none": [1, 1, -1, 1],
    "single_none": [-1],
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, params=["dense", "grouped"])
def path(request, monkeypatch):
    """Every op test runs on both paths: one product over all slots, and one per slot."""
    monkeypatch.setattr(cpu_ops, "_use_dense", lambda *_: request.param == "dense")
    return request.param


def _weights(out: int, inp: int, dtype, four_d=True) -> torch.Tensor:
    w = torch.randn(SLOTS, 1, out, inp) / inp**0.5
    return (w if four_d else w[:, 0]).to(dtype)


def _runs(mapping: list[int]):
    """sgmv metadata (seq_start, seq_len, index per run, batches, max_len, tokens), like vLLM."""
    idx, lens = torch.unique_consecutive(torch.tensor(mapping), return_counts=True)
    starts = torch.cumsum(lens, 0) - lens
    return starts, lens, idx, idx.numel(), int(lens.max()), int(lens.sum())


def _call(op: str, impl: dict, mapping, x, w, y, *args):
    """Call the bgmv form with per-token indices or the sgmv form with run metadata."""
    if op.startswith("bgmv"):
        return impl[op](x, w, y, torch.tensor(mapping), *args)
    return impl[op](x, w, y, *_runs(mapping), *args)


def _dense(x, w, mapping, y, cols, scaling=1.0, add=True, zero_none=False):
    """Per-token reference in float64: y[t, cols] (+)= scaling * x[t] @ W[slot].T; -1 rows get
    zeros (shrink, ``zero_none``) or are left alone (expand)."""
    w = w.double().reshape(SLOTS, *w.shape[-2:])
    out = y.double().clone()
    for t, slot in enumerate(mapping):
        if slot < 0:
            if zero_none:
                out[t, cols] = 0
            continue
        delta = (scaling * x[t].double() @ w[slot].T)[: out[t, cols].numel()]
        out[t, cols] = out[t, cols] + delta if add else delta
    return out


def _cases(mappings):
    return pytest.mark.parametrize("mapping", list(mappings.values()), ids=list(mappings))


# --- shrink -----------------------------------------------------------------------------------


def _shrink_inputs(mapping, dtype, four_d=True):
    x = torch.randn(len(mapping), HIDDEN).to(dtype)
    w = _weights(RANK, HIDDEN, dtype, four_d)
    y = torch.full((len(mapping), RANK + 3), 7.0)  # float32 buffer, wider than rank
    return x, w, y


@pytest.mark.parametrize("op", ["bgmv_shrink", "sgmv_shrink"])
@pytest.mark.parametrize("dtype", DTYPES)
@_cases(NO_MINUS_ONE)
def test_shrink_matches_vllm(op, dtype, mapping):
    x, w, y = _shrink_inputs(mapping, dtype)
    want, got = y.clone(), y.clone()
    _call(op, REF, mapping, x, w, want, 0.5)
    _call(op, cpu_ops.GROUPED_OPS, mapping, x, w, got, 0.5)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("op", ["bgmv_shrink", "sgmv_shrink"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("four_d", [True, False])
@_cases(WITH_MINUS_ONE | NO_MINUS_ONE)
def test_shrink_matches_dense(op, dtype, four_d, mapping):
    x, w, y = _shrink_inputs(mapping, dtype, four_d)
    got = y.clone()
    _call(op, cpu_ops.GROUPED_OPS, mapping, x, w, got, 0.5)
    want = _dense(x, w, mapping, y, slice(0, RANK), scaling=0.5, add=False, zero_none=True)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


# --- expand -----------------------------------------------------------------------------------


def _expand_inputs(mapping, dtype, out_width=OUT, four_d=True):
    x = torch.randn(len(mapping), RANK)  # float32 shrink buffer
    w = _weights(OUT, RANK, dtype, four_d)
    y = torch.randn(len(mapping), out_width).to(dtype)
    return x, w, y


@pytest.mark.parametrize("op", ["bgmv_expand", "sgmv_expand"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("out_width", [OUT, OUT - 8, OUT + 8])  # vLLM adds min(width) cols
@_cases(NO_MINUS_ONE)
def test_expand_matches_vllm(op, dtype, add_inputs, out_width, mapping):
    x, w, y = _expand_inputs(mapping, dtype, out_width)
    want, got = y.clone(), y.clone()
    _call(op, REF, mapping, x, w, want, add_inputs)
    _call(op, cpu_ops.GROUPED_OPS, mapping, x, w, got, add_inputs)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("op", ["bgmv_expand", "sgmv_expand"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("out_width", [OUT, OUT + 8])
@pytest.mark.parametrize("four_d", [True, False])
@_cases(WITH_MINUS_ONE | NO_MINUS_ONE)
def test_expand_matches_dense(op, dtype, add_inputs, out_width, four_d, mapping):
    x, w, y = _expand_inputs(mapping, dtype, out_width, four_d)
    got = y.clone()
    _call(op, cpu_ops.GROUPED_OPS, mapping, x, w, got, add_inputs)
    want = _dense(x.to(dtype), w, mapping, y, slice(0, OUT), add=add_inputs)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


def test_bgmv_expand_row_quirks_match_vllm():
    """vLLM broadcasts a single token row over all output rows and drops extra token rows."""
    w = _weights(OUT, RANK, torch.float32)
    for tokens, rows, mapping in [(1, 5, [2]), (1, 5, [-1]), (7, 4, [0, 1, 2, 3, 3, 0, 1])]:
        x, y = torch.randn(tokens, RANK), torch.randn(rows, OUT)
        want, got = y.clone(), y.clone()
        if mapping != [-1]:  # vLLM would add the last slot's delta here
            REF["bgmv_expand"](x, w, want, torch.tensor(mapping))
        cpu_ops.bgmv_expand(x, w, got, torch.tensor(mapping))
        torch.testing.assert_close(got, want)


# --- expand_slice -----------------------------------------------------------------------------

SLICES = [(0, OUT), (16, OUT), (OUT + 8, OUT)]  # (offset, size) into a 3*OUT-wide output


def _slice_inputs(mapping, dtype, four_d=True):
    x = torch.randn(len(mapping), RANK)
    w = _weights(OUT, RANK, dtype, four_d)
    y = torch.randn(len(mapping), 3 * OUT).to(dtype)
    return x, w, y


@pytest.mark.parametrize("op", ["bgmv_expand_slice", "sgmv_expand_slice"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("offset,size", SLICES)
@_cases(NO_MINUS_ONE)
def test_expand_slice_matches_vllm(op, dtype, add_inputs, offset, size, mapping):
    x, w, y = _slice_inputs(mapping, dtype)
    want, got = y.clone(), y.clone()
    _call(op, REF, mapping, x, w, want, offset, size, add_inputs)
    _call(op, cpu_ops.GROUPED_OPS, mapping, x, w, got, offset, size, add_inputs)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("op", ["bgmv_expand_slice", "sgmv_expand_slice"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("offset,size", SLICES)
@pytest.mark.parametrize("four_d", [True, False])
@_cases(WITH_MINUS_ONE | NO_MINUS_ONE)
def test_expand_slice_matches_dense(op, dtype, add_inputs, offset, size, four_d, mapping):
    x, w, y = _slice_inputs(mapping, dtype, four_d)
    got = y.clone()
    _call(op, cpu_ops.GROUPED_OPS, mapping, x, w, got, offset, size, add_inputs)
    want = _dense(x.to(dtype), w, mapping, y, slice(offset, offset + size), add=add_inputs)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


# --- the upstream bug -------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["bgmv_expand", "sgmv_expand", "bgmv_expand_slice",
                                "sgmv_expand_slice"])
def test_upstream_gives_no_adapter_rows_the_last_slot(op):
    """All slots full + a base-model row (-1): vLLM 0.32 adds slot SLOTS-1's delta to it."""
    mapping = [0, 1, -1, 2, 3]
    x, w, y = _expand_inputs(mapping, torch.float32)
    extra = (0, OUT) if "slice" in op else ()
    upstream, grouped = y.clone(), y.clone()
    _call(op, REF, mapping, x, w, upstream, *extra, True)
    _call(op, cpu_ops.GROUPED_OPS, mapping, x, w, grouped, *extra, True)
    last_slot = x[2] @ w[SLOTS - 1, 0].T
    torch.testing.assert_close(upstream[2] - y[2], last_slot)  # the bug
    assert (upstream[2] - y[2]).abs().max() > 0.1
    torch.testing.assert_close(grouped[2], y[2], rtol=0, atol=0)  # the fix
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(grouped[keep], upstream[keep])


def test_upstream_shrink_gives_no_adapter_rows_a_value():
    mapping = [0, -1, 3, 1, 2]
    x, w, y = _shrink_inputs(mapping, torch.float32)
    upstream, grouped = y.clone(), y.clone()
    REF["bgmv_shrink"](x, w, upstream, torch.tensor(mapping), 1.0)
    cpu_ops.bgmv_shrink(x, w, grouped, torch.tensor(mapping), 1.0)
    assert upstream[1, :RANK].abs().max() > 0.1
    assert grouped[1, :RANK].abs().max() == 0


# --- skipping untargeted modules, and the memo --------------------------------------------------


def test_all_zero_weights_are_skipped_and_a_later_load_is_seen():
    """A module no adapter targets has all-zero weights: shrink writes zeros, expand adds nothing.
    Loading an adapter in place (as vLLM does) must invalidate what was memoised."""
    mapping = [0, 1, -1, 3, 2]
    x, w, y = _shrink_inputs(mapping, torch.float32)
    zero = torch.zeros_like(w)
    got = y.clone()
    _call("bgmv_shrink", cpu_ops.GROUPED_OPS, mapping, x, zero, got, 1.0)
    assert got[:, :RANK].abs().max() == 0 and (got[:, RANK:] == 7.0).all()
    zero[1, 0].copy_(w[1, 0])  # vLLM's set_lora: in place, one slot
    _call("bgmv_shrink", cpu_ops.GROUPED_OPS, mapping, x, zero, got, 1.0)
    want = _dense(x, zero, mapping, y, slice(0, RANK), add=False, zero_none=True)
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
    assert got[1, :RANK].abs().max() > 0

    xe, we, ye = _expand_inputs(mapping, torch.float32)
    zero_b, got = torch.zeros_like(we), ye.clone()
    _call("bgmv_expand", cpu_ops.GROUPED_OPS, mapping, xe, zero_b, got, True)
    torch.testing.assert_close(got, ye, rtol=0, atol=0)
    zero_b[3] = we[3]  # vLLM's reset/set by item assignment
    _call("bgmv_expand", cpu_ops.GROUPED_OPS, mapping, xe, zero_b, got, True)
    torch.testing.assert_close(got.double(), _dense(xe, zero_b, mapping, ye, slice(0, OUT)),
                               **TOL[torch.float32])


# --- install() --------------------------------------------------------------------------------


@pytest.fixture
def clean_install(monkeypatch):
    monkeypatch.delenv(cpu_ops.ENV_VAR, raising=False)
    cpu_ops.uninstall()
    yield
    cpu_ops.uninstall()


def _modules():
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    return lora_ops, torch_ops, punica_cpu


def _assert_ops(expected: dict):
    for module in _modules():
        for name, fn in expected.items():
            assert getattr(module, name) is fn, (module.__name__, name)


def test_install_patches_every_reference_and_is_idempotent(clean_install):
    if not current_platform.is_cpu():
        pytest.skip("not on the CPU platform")
    _assert_ops(REF)
    assert cpu_ops.install() is True
    _assert_ops(cpu_ops.GROUPED_OPS)
    assert cpu_ops.install() is True  # second call: no double wrapping
    _assert_ops(cpu_ops.GROUPED_OPS)
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    original_linear = cpu_ops._originals["add_lora_linear"]
    assert {k: v for k, v in cpu_ops._originals.items() if k in REF} == REF
    assert PunicaWrapperCPU.add_lora_linear is cpu_ops.add_lora_linear
    cpu_ops.uninstall()
    _assert_ops(REF)
    assert PunicaWrapperCPU.add_lora_linear is original_linear
    # The grouped module itself is never rebound (its sgmv ops call its bgmv ops).
    assert all(getattr(cpu_ops, name) is fn for name, fn in cpu_ops.GROUPED_OPS.items())


@pytest.mark.parametrize("value", ["0", " 0 "])
def test_env_var_disables_install(clean_install, monkeypatch, value):
    monkeypatch.setenv(cpu_ops.ENV_VAR, value)
    assert cpu_ops.install() is False
    _assert_ops(REF)


def test_install_skips_unverified_versions_and_other_platforms(clean_install, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    assert cpu_ops.install() is False
    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    assert cpu_ops.install() is False
    _assert_ops(REF)


@pytest.mark.parametrize("is_prefill", [True, False])
def test_punica_cpu_wrapper_end_to_end(clean_install, is_prefill):
    """Through PunicaWrapperCPU (what vLLM's LoRA layers call), all slots full, one base request:
    upstream changes the base rows, the installed grouped ops do not."""
    if not current_platform.is_cpu():
        pytest.skip("not on the CPU platform")
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    lora_ids = [11, 12, 13, 14]  # slot -> lora id; all SLOTS slots hold an adapter
    tokens = [11, 11, 0, 0, 0, 14, 12, 12, 13, 0]  # lora id per token, 0 = base model
    slots = [lora_ids.index(t) if t else -1 for t in tokens]
    mapping = LoRAMapping(tuple(tokens), tuple(tokens), is_prefill=is_prefill)
    x = torch.randn(len(tokens), HIDDEN)
    a = (_weights(RANK, HIDDEN, torch.float32), _weights(RANK, HIDDEN, torch.float32))
    b = (_weights(OUT, RANK, torch.float32), _weights(OUT // 2, RANK, torch.float32))
    y = torch.randn(len(tokens), OUT + OUT // 2)

    def run():
        wrapper = PunicaWrapperCPU(64, 8, device="cpu")
        wrapper.update_metadata(mapping, lora_ids, SLOTS, vocab_size=100)
        out = y.clone()
        wrapper.add_lora_linear(out, x, a, b, 1.0, (OUT, OUT // 2))
        logits = y.clone()
        wrapper.add_lora_logits(logits, x, a[0], b[0], 1.0)
        return out, logits

    base = [t for t, s in enumerate(slots) if s < 0]
    upstream_out, upstream_logits = run()
    assert (upstream_out[base] - y[base]).abs().max() > 0.01  # the bug, via the wrapper
    assert (upstream_logits[base, :OUT] - y[base, :OUT]).abs().max() > 0.01
    assert cpu_ops.install() is True
    out, logits = run()
    torch.testing.assert_close(out[base], y[base], rtol=0, atol=0)
    torch.testing.assert_close(logits[base, :OUT], y[base, :OUT], rtol=0, atol=0)

    want = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            h = [x[t].double() @ a_i[s, 0].double().T for a_i in a]
            want[t] += torch.cat([h[0] @ b[0][s, 0].double().T, h[1] @ b[1][s, 0].double().T])
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    adapter = [t for t, s in enumerate(slots) if s >= 0]
    torch.testing.assert_close(out[adapter], upstream_out[adapter])


@pytest.mark.parametrize("inference", [False, True], ids=["versioned", "inference tensors"])
@pytest.mark.parametrize("is_prefill", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@_cases({**NO_MINUS_ONE, **WITH_MINUS_ONE})
def test_fused_linear_matches_dense(clean_install, is_prefill, dtype, mapping, inference):
    """The fused add_lora_linear (one shrink, one expand for all slices) on a q/k/v-like layer whose
    middle slice no adapter targets; then after a load into that slice, then after a load replacing one
    slot of the targeted slices. vLLM's tensors are inference tensors, whose memo a load refreshes slot
    by slot; versioned tensors are rebuilt whole."""
    if not current_platform.is_cpu():
        pytest.skip("not on the CPU platform")
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    assert cpu_ops.install() is True
    lora_ids = [11, 12, 13, 14]
    tokens = tuple(lora_ids[s] if s >= 0 else 0 for s in mapping)
    wrapper = PunicaWrapperCPU(64, len(mapping), device="cpu")  # room for one sequence per token
    wrapper.update_metadata(LoRAMapping(tokens, tokens, is_prefill=is_prefill), lora_ids, SLOTS, vocab_size=100)
    load = cpu_ops._count_loads(lambda self, lora_id: True)
    manager = SimpleNamespace(lora_index_to_id=lora_ids)
    widths = (OUT, OUT // 2, OUT // 2)
    with torch.inference_mode(inference):
        a = tuple(_weights(RANK, HIDDEN, dtype) for _ in widths)
        b = tuple(_weights(w, RANK, dtype) for w in widths)
        a[1].zero_()
        b[1].zero_()
        x = torch.randn(len(mapping), HIDDEN).to(dtype)
        y = torch.randn(len(mapping), sum(widths)).to(dtype)

        def want():
            out = y.double().clone()
            for t, s in enumerate(mapping):
                if s >= 0:
                    out[t] += torch.cat([0.5 * x[t].double() @ a_i[s, 0].double().T @ b_i[s, 0].double().T
                                         for a_i, b_i in zip(a, b)])
            return out

        for written in [(1, 2), (0, 0), None]:  # (slice, slot) a load writes before the next check
            got = y.clone()
            wrapper.add_lora_linear(got, x, a, b, 0.5, widths)
            torch.testing.assert_close(got.double(), want(), **TOL[dtype])
            if written:
                i, slot = written
                a[i][slot, 0].copy_(torch.randn(RANK, HIDDEN).to(dtype))
                b[i][slot, 0].copy_(torch.randn(widths[i], RANK).to(dtype))
                load(manager, lora_ids[slot])


def test_inference_mode_weights_are_memoised_until_vllm_loads_an_adapter(clean_install):
    """vLLM's stacked LoRA tensors are inference tensors (no version counter): the memo must hold across
    calls and be dropped when LoRAModelManager.activate_adapter writes into a slot."""
    if not current_platform.is_cpu():
        pytest.skip("not on the CPU platform")
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    assert cpu_ops.install() is True
    calls = []
    counted = cpu_ops._count_loads(lambda self, lora_id: calls.append(lora_id) or lora_id > 11)
    mapping = [0, 1, -1, 1]
    tokens = tuple(s + 11 if s >= 0 else 0 for s in mapping)
    wrapper = PunicaWrapperCPU(64, len(mapping), device="cpu")
    wrapper.update_metadata(LoRAMapping(tokens, tokens, is_prefill=False), [11, 12, 13, 14], SLOTS, vocab_size=100)
    with torch.inference_mode():
        a = (_weights(RANK, HIDDEN, torch.float32),)
        b = (_weights(OUT, RANK, torch.float32),)
        x, y = torch.randn(len(mapping), HIDDEN), torch.zeros(len(mapping), OUT)
        first = y.clone()
        wrapper.add_lora_linear(first, x, a, b, 1.0, (OUT,))
        assert a[0]._vllm_t2l_fused[2] is cpu_ops._fused_weights(a, b, (OUT,))  # memoised
        b[0][1].mul_(2)  # a write that did not go through activate_adapter: not seen
        stale = y.clone()
        wrapper.add_lora_linear(stale, x, a, b, 1.0, (OUT,))
        torch.testing.assert_close(stale, first)
        manager = SimpleNamespace(lora_index_to_id=[11, 12, None, None])  # id 12 sits in slot 1
        assert counted(manager, 11) is False  # already active: nothing written, the memo stays
        stale = y.clone()
        wrapper.add_lora_linear(stale, x, a, b, 1.0, (OUT,))
        torch.testing.assert_close(stale, first)
        b[0][0].mul_(3)  # slot 0 changed behind vLLM's back too
        assert counted(manager, 12) is True and calls == [11, 12]  # slot 1 written: that slot is refreshed
        fresh = y.clone()
        wrapper.add_lora_linear(fresh, x, a, b, 1.0, (OUT,))
        assert counted(SimpleNamespace(lora_index_to_id=[]), 13) is True  # slot unknown: all refreshed
        everything = y.clone()
        wrapper.add_lora_linear(everything, x, a, b, 1.0, (OUT,))
    torch.testing.assert_close(fresh[[1, 3]], 2 * first[[1, 3]])
    torch.testing.assert_close(fresh[0], first[0])
    torch.testing.assert_close(everything[[0, 1, 3]], torch.stack([3 * first[0], 2 * first[1], 2 * first[3]]))
    assert LoRAModelManager.activate_adapter.__qualname__.endswith("counted")
    cpu_ops.uninstall()
    assert not LoRAModelManager.activate_adapter.__qualname__.endswith("counted")


@pytest.mark.parametrize("slots_total, dense", [(4, True), (8, True), (16, False)])
def test_dense_path_only_when_most_slots_are_in_use(slots_total, dense):
    """A decode batch of 4 tokens on 4 adapters: the dense product reads every slot's weights, so with
    16 slots (12 of them unused here) the grouped path is taken."""
    plan = cpu_ops._plan(torch.tensor([0, 1, 2, 3]))
    assert USE_DENSE(plan, slots_total, 16) is dense
    assert not USE_DENSE(cpu_ops._plan(torch.tensor([2, 2, 2, 2])), 4, 16)  # one adapter: grouped


# --- add_lora_linear layouts -------------------------------------------------------------------


def _reference_linear(y, x, a, b, mapping, scale):
    out = y.double().clone()
    for t, s in enumerate(mapping):
        if s >= 0:
            out[t] += torch.cat([scale * x[t].double() @ a_i[s, 0].double().T @ b_i[s, 0].double().T
                                 for a_i, b_i in zip(a, b)])
    return out


def _qkv(rank_used: int, max_rank: int = 2 * RANK):
    """A q/k/v-like layer whose k slice no adapter targets, adapters of rank ``rank_used`` zero-padded to
    ``max_rank`` as vLLM stores them."""
    widths = (OUT, OUT // 2, OUT // 2)
    a = tuple(_weights(max_rank, HIDDEN, torch.float32) for _ in widths)
    b = tuple(_weights(w, max_rank, torch.float32) for w in widths)
    for t in a:
        t[:, :, rank_used:] = 0
    a[1].zero_()
    b[1].zero_()
    return widths, a, b


LAYOUTS = {
    "every_slot_once": [3, 0, 2, 1],
    "equal_groups": [1, 2, 1, 2, 2, 1],
    "padded_groups_and_none": [0, 0, 0, -1, 2, 1, -1],
    "gathered_slots": [3, 0, 3, 0, -1],
    "long_prompt_and_decode": [1] * 12 + [0, 3],
}


@_cases(LAYOUTS)
def test_fused_linear_layouts_match_reference(mapping):
    """Equal groups, groups padded to equal length, slots gathered out of order, and one group at a time (a long
    prompt beside decode tokens) all give the per-token result; rows with no adapter are left bit for bit."""
    widths, a, b = _qkv(RANK)
    x, y = torch.randn(len(mapping), HIDDEN), torch.randn(len(mapping), sum(widths))
    got = y.clone()
    cpu_ops.add_lora_linear(SimpleNamespace(token_lora_indices=torch.tensor(mapping)), got, x, a, b, 0.5, widths)
    torch.testing.assert_close(got.double(), _reference_linear(y, x, a, b, mapping, 0.5), **TOL[torch.float32])
    none = [t for t, s in enumerate(mapping) if s < 0]
    assert torch.equal(got[none], y[none])


def test_products_per_layer_do_not_grow_with_adapters():
    """A decode batch of 16 tokens on 16 adapters runs two matrix products in all (one shrink, one expand),
    not one or two per adapter: on CPU each small product costs more in call overhead than in arithmetic."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket.__name__ in {"mm", "bmm", "addmm", "baddbmm", "matmul"}
            return func(*args, **(kwargs or {}))

    slots, hidden = 16, 64
    a = (torch.randn(slots, 1, RANK, hidden), torch.randn(slots, 1, RANK, hidden))
    b = (torch.randn(slots, 1, hidden, RANK), torch.randn(slots, 1, hidden // 2, RANK))
    wrapper = SimpleNamespace(token_lora_indices=torch.randperm(slots))
    x, y = torch.randn(slots, hidden), torch.zeros(slots, hidden + hidden // 2)
    cpu_ops.add_lora_linear(wrapper, y, x, a, b, 1.0, (hidden, hidden // 2))  # builds the fused weights
    with Products() as products:
        cpu_ops.add_lora_linear(wrapper, y, x, a, b, 1.0, (hidden, hidden // 2))
    assert products.count == 2


def test_padded_ranks_are_cut_and_a_longer_rank_rebuilds():
    """Rank-8 adapters on a rank-16 engine: the fused adapter keeps 8 rank rows per targeted slice, not 16.
    A later load of a rank-16 adapter into one slot widens it again, and every slot stays exact."""
    mapping = [0, 1, 2, 3, -1, 1]
    load = cpu_ops._count_loads(lambda self, lora_id: True)
    manager = SimpleNamespace(lora_index_to_id=[11, 12, 13, 14])
    wrapper = SimpleNamespace(token_lora_indices=torch.tensor(mapping))
    with torch.inference_mode():
        widths, a, b = _qkv(RANK)
        x, y = torch.randn(len(mapping), HIDDEN), torch.randn(len(mapping), sum(widths))
        got = y.clone()
        cpu_ops.add_lora_linear(wrapper, got, x, a, b, 1.0, widths)
        assert cpu_ops._fused_weights(a, b, widths).a.shape[1] == 2 * RANK  # q and v, rank 8 each
        torch.testing.assert_close(got.double(), _reference_linear(y, x, a, b, mapping, 1.0), **TOL[torch.float32])
        for t in (a[0], a[2]):
            t[1, 0].copy_(torch.randn(2 * RANK, HIDDEN))
        load(manager, 12)
        got = y.clone()
        cpu_ops.add_lora_linear(wrapper, got, x, a, b, 1.0, widths)
        assert cpu_ops._fused_weights(a, b, widths).a.shape[1] == 4 * RANK
        torch.testing.assert_close(got.double(), _reference_linear(y, x, a, b, mapping, 1.0), **TOL[torch.float32])
