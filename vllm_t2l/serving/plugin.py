"""vLLM general plugin: runs in every vLLM process; registers the resolver, CPU op fixes (with torch.compile
kept on), and fast folder loads."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_t2l.serving.resolver import T2LResolver

log = logging.getLogger("vllm.t2l")  # under vLLM's configured logger
_resolver: T2LResolver | None = None


def register() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from vllm_t2l.serving import compiled_lora, cpu_ops, hooks, worker_load
    from vllm_t2l.serving.resolver import Settings, T2LResolver

    global _resolver
    if cpu_ops.install():
        compiled_lora.install()
    worker_load.install()
    _resolver = T2LResolver(Settings.from_env())
    LoRAResolverRegistry.register_resolver("vllm-t2l", _resolver)
    hooks.install(_resolver)


def resolver() -> T2LResolver | None:
    """This process's resolver, for the studio's routes (None before ``register`` ran)."""
    return _resolver


def studio():
    """The ``vllm.endpoint_plugins`` factory: the studio's routes (see ``serving.studio``)."""
    from vllm_t2l.serving.studio import StudioPlugin

    return StudioPlugin()
