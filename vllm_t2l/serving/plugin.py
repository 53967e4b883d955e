"""vLLM general plugin: runs in every vLLM process; registers the resolver, CPU op fixes (with torch.compile
kept on), and fast folder loads."""

import logging

log = logging.getLogger("vllm.t2l")  # under vLLM's configured logger


def register() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from vllm_t2l.serving import compiled_lora, cpu_ops, hooks, worker_load
    from vllm_t2l.serving.resolver import Settings, T2LResolver

    if cpu_ops.install():
        compiled_lora.install()
    worker_load.install()
    resolver = T2LResolver(Settings.from_env())
    LoRAResolverRegistry.register_resolver("vllm-t2l", resolver)
    hooks.install(resolver)
