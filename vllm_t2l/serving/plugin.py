"""vLLM general plugin: runs in every vLLM process; registers the resolver and the CPU op fixes."""

import logging

log = logging.getLogger("vllm.t2l")  # under vLLM's configured logger


def register() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from vllm_t2l.serving import cpu_ops, hooks
    from vllm_t2l.serving.resolver import Settings, T2LResolver

    cpu_ops.install()
    resolver = T2LResolver(Settings.from_env())
    LoRAResolverRegistry.register_resolver("vllm-t2l", resolver)
    hooks.install(resolver)
