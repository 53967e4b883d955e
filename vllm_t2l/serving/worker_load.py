"""vLLM's workers read the adapter folders our resolver writes in one call, not one per tensor.

Why: a cache miss waits on the worker's load of the new folder. vLLM's loader
(``LoRAModel.from_local_checkpoint``) reads and name-checks the safetensors file's 120 tensors one at a
time. Here ``tensorfile.load`` reads the file in one call, or ``codes.expand`` builds the weights from
a Zhyper adapter's codes, and the tensors go to ``from_lora_tensors``, the constructor vLLM's loader
ends in. Only folders carrying our metadata sidecar take this path, and only in the plain case (no
skipped prefixes or expert sharding); any other folder, and any of ours that does not read cleanly or
targets a module the model does not expect, goes through vLLM's loader unchanged, which raises its own
errors. The folders of vLLM's filesystem resolver (the cold-miss baseline) never take it.

The tensors are views into buffers from ``Buffers``, which hands a buffer out again once the adapter
holding it is gone (vLLM keeps an adapter in its CPU LRU until evicted, and copies it into its stacked
slots to serve it). A miss per request then reuses the same buffers (two per target module of each
adapter vLLM holds) instead of allocating and freeing megabytes in a new order each time, which
fragmented the worker's heap: its memory grew with every name served (docs/benchmarks.md, "Scale").
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections import defaultdict
from pathlib import Path

import torch

from vllm_t2l import codes, tensorfile
from vllm_t2l.lora import METADATA_FILE, WEIGHTS_FILE

log = logging.getLogger("vllm.t2l")
VERIFIED_RELEASES = {(0, 32)}  # releases whose from_local_checkpoint was read against this


class Buffers:
    """Byte buffers by size, handed out again once their owner is garbage."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free[nbytes]
            return free.pop() if free else torch.empty(nbytes, dtype=torch.uint8)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for buf in buffers:
                self._free[buf.numel()].append(buf)

    def free(self) -> int:
        """Buffers waiting to be handed out again."""
        with self._lock:
            return sum(map(len, self._free.values()))


BUFFERS = Buffers()


def read_ours(lora_dir: Path, peft_helper, taken: list[torch.Tensor]) -> dict | None:
    """The folder's tensors if it is one of ours that reads cleanly, else None; ``taken`` gets the
    buffers from ``BUFFERS`` they live in."""
    if not (lora_dir / METADATA_FILE).is_file():
        return None

    def alloc(nbytes: int) -> torch.Tensor:
        taken.append(BUFFERS.take(nbytes))
        return taken[-1]

    try:
        if (lora_dir / codes.CODES_FILE).is_file():
            return codes.expand(lora_dir, peft_helper.lora_alpha, peft_helper.use_rslora, alloc).state_dict()
        return tensorfile.load(lora_dir / WEIGHTS_FILE, alloc)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        log.warning("vllm-t2l: %s not read by the fast path (%s); using vLLM's loader", lora_dir, e)
        return None


def installed() -> bool:
    """Whether vLLM's loader in this process reads our folders (then so do the workers: same vLLM)."""
    from vllm.lora.lora_model import LoRAModel

    return getattr(LoRAModel, "_vllm_t2l_load", False)


def install() -> bool:
    """Route vLLM's folder loads through ``read_ours``; return whether it is in place."""
    import vllm
    from vllm.lora.lora_model import LoRAModel

    from vllm_t2l.serving.cpu_ops import release

    if release(vllm.__version__) not in VERIFIED_RELEASES:
        return False
    if installed():
        return True
    original = LoRAModel.from_local_checkpoint.__func__

    @functools.wraps(original)
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *, lora_model_id=None,
                              skip_prefixes=None, moe_ep_spec=None, **kwargs):
        plain = lora_model_id is not None and not skip_prefixes and moe_ep_spec is None
        taken: list[torch.Tensor] = []
        tensors = read_ours(Path(lora_dir), peft_helper, taken) if plain else None
        if tensors is not None:
            lora = cls.from_lora_tensors(lora_model_id=lora_model_id, tensors=tensors, peft_helper=peft_helper,
                                         **kwargs)
            weakref.finalize(lora, BUFFERS.give_back, taken)
            if all(name.rsplit(".", 1)[-1] in expected_lora_modules for name in lora.loras):
                return lora
        elif taken:
            BUFFERS.give_back(taken)
        return original(cls, lora_dir, expected_lora_modules, peft_helper, lora_model_id=lora_model_id,
                        skip_prefixes=skip_prefixes, moe_ep_spec=moe_ep_spec, **kwargs)

    LoRAModel.from_local_checkpoint = classmethod(from_local_checkpoint)
    LoRAModel._vllm_t2l_load = True
    return True
