"""Tests for vllm_t2l.serving.compiled_lora: torch.compile stays on with LoRA on CPU, LoRA as an opaque op."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.platforms import current_platform

from vllm_t2l.serving import compiled_lora, cpu_ops

pytestmark = pytest.mark.skipif(not current_platform.is_cpu(), reason="not on the CPU platform")

SLOTS, RANK, HIDDEN = 4, 8, 32
WIDTHS = (32, 16, 16)  # q, k, v of a fused qkv layer; adapters target q and v


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.delenv(cpu_ops.ENV_VAR, raising=False)
    monkeypatch.delenv(compiled_lora.ENV_VAR, raising=False)
    compiled_lora.uninstall()
    cpu_ops.uninstall()
    assert cpu_ops.install() and compiled_lora.install()
    yield
    compiled_lora.uninstall()
    cpu_ops.uninstall()


def _engine_config(targets: list[str] | None):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_t2l.models import prepare_default_model

    kw = {"model": str(prepare_default_model()), "dtype": "float32", "max_model_len": 512}
    if targets is not None:
        kw |= {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2, "lora_target_modules": targets}
    return EngineArgs(**kw).create_engine_config()


def test_lora_engine_keeps_the_compilation_mode_of_a_plain_engine(installed):
    """vLLM's CPU platform alone sets NONE whenever LoRA is on; with the op, linear targets keep the
    mode a plain engine gets, and any other target (an embedding) still gets NONE."""
    from vllm.config import CompilationMode

    plain = _engine_config(None).compilation_config
    assert plain.mode != CompilationMode.NONE
    lora = _engine_config(["q_proj", "v_proj"]).compilation_config
    assert (lora.mode, lora.backend) == (plain.mode, plain.backend)
    assert _engine_config(["q_proj", "embed_tokens"]).compilation_config.mode == CompilationMode.NONE
    compiled_lora.uninstall()
    assert _engine_config(["q_proj", "v_proj"]).compilation_config.mode == CompilationMode.NONE


def _weights(out: int, inp: int) -> torch.Tensor:
    return torch.randn(SLOTS, 1, out, inp) / inp ** 0.5


def test_compiled_graph_follows_each_batch_adapters(installed):
    """One fullgraph, dynamic-shape inductor compile of a layer's LoRA call serves batches of other sizes
    and other slot mappings (no-adapter rows included) exactly as the eager ops do: nothing about the
    batch is baked into the graph. Without the op, dynamo cannot trace the grouped ops (fullgraph fails)."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    torch.manual_seed(0)
    lora_ids = [11, 12, 13, 14]
    wrapper = PunicaWrapperCPU(64, 16, device="cpu")
    a = tuple(_weights(RANK, HIDDEN) for _ in WIDTHS)
    b = tuple(_weights(w, RANK) for w in WIDTHS)
    a[1].zero_()
    b[1].zero_()
    compiled_lora._LAYERS["test.qkv"] = SimpleNamespace(punica_wrapper=wrapper, lora_a_stacked=a, lora_b_stacked=b,
                                                        output_slices=WIDTHS)

    def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = x @ w
        torch.ops.vllm_t2l.lora_linear(y, x, "test.qkv")
        return torch.relu(y)

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    w = torch.randn(HIDDEN, sum(WIDTHS))
    try:
        for mapping, prefill in [([0, 1, 2, 3, 0], True), ([-1, 3, -1, 3, 1, 1, -1], False), ([2], False),
                                 ([-1, -1, -1], False)]:
            tokens = tuple(lora_ids[s] if s >= 0 else 0 for s in mapping)
            wrapper.update_metadata(LoRAMapping(tokens, tokens, is_prefill=prefill), lora_ids, SLOTS,
                                    vocab_size=100)
            x = torch.randn(len(mapping), HIDDEN)
            want = x.double() @ w.double()
            for t, s in enumerate(mapping):
                if s >= 0:
                    want[t] += torch.cat([x[t].double() @ a_i[s, 0].double().T @ b_i[s, 0].double().T
                                          for a_i, b_i in zip(a, b)])
            torch.testing.assert_close(compiled(x, w).double(), torch.relu(want), rtol=1e-5, atol=1e-4)
    finally:
        compiled_lora._LAYERS.pop("test.qkv")


def test_grouped_ops_alone_do_not_trace(installed):
    """The reason for the op: dynamo cannot trace the grouped ops' data-dependent grouping."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(64, 16, device="cpu")
    wrapper.update_metadata(LoRAMapping((11, 12), (11, 12), is_prefill=False), [11, 12, 13, 14], SLOTS,
                            vocab_size=100)
    a = tuple(_weights(RANK, HIDDEN) for _ in WIDTHS)
    b = tuple(_weights(w, RANK) for w in WIDTHS)

    def layer(x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(x.shape[0], sum(WIDTHS))
        wrapper.add_lora_linear(y, x, a, b, 1.0, WIDTHS)
        return y

    with pytest.raises(Exception):  # noqa: B017 (dynamo's error class differs between torch releases)
        torch.compile(layer, fullgraph=True, dynamic=True)(torch.randn(2, HIDDEN))


def test_batch_without_adapters_skips_the_lora_ops(installed, monkeypatch):
    """A batch whose tokens all have no adapter (index -1) leaves the output as it is and never reaches the
    grouped ops; a batch with an adapter still does, also after an all-base one whose mapping is not a
    prefill one (vLLM then leaves ``no_lora`` as it was)."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    torch.manual_seed(0)
    lora_ids = [11, 12, 13, 14]
    wrapper = PunicaWrapperCPU(64, 16, device="cpu")
    calls = []
    real = wrapper.add_lora_linear
    monkeypatch.setattr(wrapper, "add_lora_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    a = tuple(_weights(RANK, HIDDEN) for _ in WIDTHS)
    b = tuple(_weights(w, RANK) for w in WIDTHS)
    compiled_lora._LAYERS["test.qkv"] = SimpleNamespace(punica_wrapper=wrapper, lora_a_stacked=a, lora_b_stacked=b,
                                                        output_slices=WIDTHS)
    try:
        for tokens, prefill, used in [((0, 0, 0), True, False), ((11, 0, 12), False, True), ((0, 0), True, False),
                                      ((0, 13), True, True)]:
            wrapper.update_metadata(LoRAMapping(tokens, tokens, is_prefill=prefill), lora_ids, SLOTS, vocab_size=100)
            x, y = torch.randn(len(tokens), HIDDEN), torch.randn(len(tokens), sum(WIDTHS))
            before, calls[:] = y.clone(), []
            torch.ops.vllm_t2l.lora_linear(y, x, "test.qkv")
            assert bool(calls) == used
            rows = [t for t, i in enumerate(tokens) if i > 0]
            assert not torch.equal(y[rows], before[rows]) if used else torch.equal(y, before)
            torch.testing.assert_close(y[[t for t, i in enumerate(tokens) if i == 0]],
                                       before[[t for t, i in enumerate(tokens) if i == 0]], rtol=0, atol=0)
    finally:
        compiled_lora._LAYERS.pop("test.qkv")
