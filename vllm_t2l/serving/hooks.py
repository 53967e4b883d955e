"""The two seams vLLM 0.32 lacks for a generating resolver, added by wrapping OpenAIServingModels.

1. Start-up: load the checkpoint once the served model's config is known, and refuse to start
   when it does not fit (vLLM offers resolvers no start-up call).
2. Errors: vLLM does not catch exceptions raised inside a resolver and turns a None into a vague
   404, so our typed errors become a 400 whose message names the problem.
It also lets the adapter cache unregister evicted names, so vLLM never reads a deleted folder.
"""

from __future__ import annotations

import functools
import logging
from http import HTTPStatus

from vllm_t2l.serving.resolver import AdapterRequestError, T2LResolver

log = logging.getLogger("vllm.t2l")  # under vLLM's configured logger


def install(resolver: T2LResolver) -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response

    if getattr(OpenAIServingModels, "_vllm_t2l", False):
        return
    original_init = OpenAIServingModels.__init__
    original_resolve = OpenAIServingModels.resolve_lora

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        lora_config = getattr(self.engine_client.vllm_config, "lora_config", None)
        if lora_config is None:
            log.warning("vllm-t2l: LoRA is not enabled (--enable-lora); t2l: names will not resolve")
            return
        resolver.start(self.model_config.hf_config.to_dict(), self.model_config.model,
                       lora_config.max_lora_rank)
        resolver.on_evict = functools.partial(_unregister, self)

    @functools.wraps(original_resolve)
    async def resolve_lora(self, lora_name: str):
        try:
            return await original_resolve(self, lora_name)
        except AdapterRequestError as e:
            return create_error_response(message=str(e), err_type="BadRequestError",
                                         status_code=HTTPStatus.BAD_REQUEST, param="model")

    OpenAIServingModels.__init__ = __init__
    OpenAIServingModels.resolve_lora = resolve_lora
    OpenAIServingModels._vllm_t2l = True


def _unregister(models, lora_names: set[str]) -> None:
    """Forget evicted names; the next request for one resolves (and regenerates) it again.

    vLLM's engine keeps the weights in its own LRU (--max-cpu-loras) until they are pushed out.
    """
    for name in lora_names:
        models.lora_requests.pop(name, None)
