"""torch.compile with LoRA enabled on CPU: the LoRA delta of each linear layer as one opaque custom op.

Why: vLLM 0.32's CPU platform turns torch.compile off whenever a LoRA config is present
(``CpuPlatform.check_and_update_config`` sets ``CompilationMode.NONE``), because its CPU LoRA ops pick
per-token weights with Python-level, data-dependent code that dynamo cannot trace. So a LoRA-enabled
engine runs the whole model eagerly, base-model requests included, and is slower than plain vLLM.

Here the LoRA part of every wrapped linear layer (``BaseLinearLayerWithLoRA._apply_lora_to_output``) is one
call of the custom op ``vllm_t2l::lora_linear(y, x, layer)``, registered with ``torch.library`` as mutating
``y`` only. Dynamo records it as one opaque node; at run time the op runs the grouped ops of
``serving.cpu_ops`` eagerly, reading the batch's adapter slots from the punica wrapper at that moment, so
nothing about the batch is baked into the compiled graph. The layer is named by a string constant (its
key in ``_LAYERS``), so no LoRA weight is a graph input. With that in place, the platform hook's
``NONE`` is undone: the compilation mode goes back to what vLLM's CPU platform picks without LoRA.

Only when the grouped CPU ops are installed (``cpu_ops.install()``), only for LoRA target modules that
are linear projections (other LoRA layers, such as embeddings, still use Python-level ops inside the
model's forward), and ``VLLM_T2L_CPU_COMPILE=0`` turns it off.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger("vllm.t2l.compiled_lora")

ENV_VAR = "VLLM_T2L_CPU_COMPILE"
# Target module names whose LoRA layers are linear (the only kind the op covers).
LINEAR_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                            "qkv_proj", "gate_up_proj"})

_LAYERS: dict[str, torch.nn.Module] = {}  # key -> BaseLinearLayerWithLoRA, filled as vLLM registers them
_originals: dict[str, object] = {}


@torch.library.custom_op("vllm_t2l::lora_linear", mutates_args=("y",), device_types="cpu")
def lora_linear(y: torch.Tensor, x: torch.Tensor, layer: str) -> None:
    """``y += lora(x)`` for the layer called ``layer``, with this step's adapters, eagerly.

    A batch without adapters returns at once: vLLM's wrapper sets ``no_lora`` with the batch's indices when
    every token has none (CPU mappings are always "prefill" ones; ``no_lora`` is not updated otherwise).
    That spares base-model steps the grouped ops' per-layer Python work, ~30 calls a step.
    """
    m = _LAYERS[layer]
    wrapper = m.punica_wrapper
    if wrapper.no_lora and wrapper.is_prefill:
        return
    wrapper.add_lora_linear(y, x, m.lora_a_stacked, m.lora_b_stacked, 1.0, m.output_slices)


@lora_linear.register_fake
def _(y: torch.Tensor, x: torch.Tensor, layer: str) -> None:
    return None


def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """vLLM's ``_apply_lora_to_output`` (CPU: in place) with the LoRA part as one ``lora_linear`` call."""
    key = getattr(self, "_vllm_t2l_key", None)
    if key is None:
        return _originals["_apply_lora_to_output"](self, x, output)
    shape = output.shape if output.ndim == 3 else None
    if x.ndim == 3 and output.ndim == 3:
        output, x = output.flatten(0, 1), x.flatten(0, 1)
    torch.ops.vllm_t2l.lora_linear(output, x, key)
    return output.reshape(shape) if shape is not None else output


def _register_module(register_module):
    """``LoRAModelManager.register_module`` that also keys linear LoRA layers for ``lora_linear``."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    def register(self, module_name: str, module) -> None:
        register_module(self, module_name, module)
        if isinstance(module, BaseLinearLayerWithLoRA):
            key = f"{id(self):x}.{module_name}"
            _LAYERS[key] = module
            module._vllm_t2l_key = key
    return register


def compile_safe(lora_config) -> bool:
    """Whether every LoRA layer the engine will create is a linear layer the op covers."""
    targets = getattr(lora_config, "target_modules", None)
    return bool(targets) and all(t.rsplit(".", 1)[-1] in LINEAR_TARGETS for t in targets)


def _keep_compile(check_and_update_config):
    """The CPU platform's config hook, minus its "LoRA: no torch.compile" line when ``compile_safe``."""
    def hook(cls, vllm_config) -> None:
        from vllm.config import CompilationMode

        lora = vllm_config.lora_config
        if lora is None or not compile_safe(lora):
            return check_and_update_config(vllm_config)
        vllm_config.lora_config = None  # the hook's only use of it is to turn compilation off
        try:
            check_and_update_config(vllm_config)
        finally:
            vllm_config.lora_config = lora
        if vllm_config.compilation_config.mode != CompilationMode.NONE:
            logger.info("vllm_t2l: torch.compile stays on with LoRA (mode %s; LoRA as vllm_t2l::lora_linear); "
                        "%s=0 turns it off", vllm_config.compilation_config.mode.name, ENV_VAR)
    return hook


def install() -> bool:
    """Patch vLLM so a LoRA-enabled CPU engine compiles the model; return whether it is in place.

    Call after ``cpu_ops.install()`` succeeded (the op runs the grouped ops), in every vLLM process.
    """
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    if _originals:
        return True
    cpu = importlib.import_module("vllm.platforms.cpu").CpuPlatform
    base_linear = importlib.import_module("vllm.lora.layers.base_linear").BaseLinearLayerWithLoRA
    manager = importlib.import_module("vllm.lora.model_manager").LoRAModelManager
    _originals["check_and_update_config"] = cpu.check_and_update_config
    _originals["_apply_lora_to_output"] = base_linear._apply_lora_to_output
    _originals["register_module"] = manager.register_module
    cpu.check_and_update_config = classmethod(_keep_compile(cpu.check_and_update_config))
    base_linear._apply_lora_to_output = _apply_lora_to_output
    manager.register_module = _register_module(manager.register_module)
    return True


def uninstall() -> None:
    """Restore vLLM's functions (for tests and A/B comparisons)."""
    if _originals:
        importlib.import_module("vllm.platforms.cpu").CpuPlatform.check_and_update_config = classmethod(
            _originals.pop("check_and_update_config").__func__)
        importlib.import_module("vllm.lora.layers.base_linear").BaseLinearLayerWithLoRA._apply_lora_to_output = (
            _originals.pop("_apply_lora_to_output"))
        importlib.import_module("vllm.lora.model_manager").LoRAModelManager.register_module = _originals.pop(
            "register_module")
        _LAYERS.clear()
