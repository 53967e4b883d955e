"""The seams vLLM 0.32 lacks for a generating resolver, added by wrapping OpenAIServingModels.

1. Start-up: load the checkpoint once the served model's config is known, and refuse to start
   when it does not fit (vLLM offers resolvers no start-up call).
2. Resolution of ``t2l:`` names is done here rather than by vLLM's ``resolve_lora``, because vLLM's
   keeps a lock per name ever asked for, logs the name, quotes it in errors and gives every name its
   own engine id. Here the engine knows an adapter only by its content id (``t2l-<hex>``, one engine
   id per content however it is spelled), errors are 400s that name the problem, a folder vLLM cannot
   load is regenerated on the next request, and the names registered with vLLM stay bounded by the
   cache (evicted adapters' names are unregistered, so vLLM never reads a deleted folder).
3. Privacy: ``/v1/models`` does not list generated adapters (their names are clients' descriptions,
   their roots cache paths); ``vllm:lora_requests_info`` keeps only its current label set, so
   ``/metrics`` does not grow with traffic; names starting with ``t2l`` cannot be loaded or unloaded
   through ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (no client can bind another's
   description to a folder of its choosing, or probe which descriptions are in use).
"""

from __future__ import annotations

import functools
import logging
from http import HTTPStatus

from vllm_t2l import names
from vllm_t2l.serving import metrics
from vllm_t2l.serving.resolver import ADAPTER_PREFIX, AdapterRequestError, T2LResolver, adapter_name, shown

log = logging.getLogger("vllm.t2l")  # under vLLM's configured logger


def reserved(name: str) -> bool:
    """Names only the plugin may register: ``t2l:`` names and the engine names of generated adapters."""
    return names.is_t2l_name(name) or name.startswith(ADAPTER_PREFIX)


def install(resolver: T2LResolver) -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    if getattr(OpenAIServingModels, "_vllm_t2l", False):
        return
    original_init = OpenAIServingModels.__init__
    original_resolve = OpenAIServingModels.resolve_lora
    original_show = OpenAIServingModels.show_available_models
    original_load = OpenAIServingModels.load_lora_adapter
    original_unload = OpenAIServingModels.unload_lora_adapter
    original_record = PrometheusStatLogger.record

    def bad_request(message: str):
        return create_error_response(message=message, err_type="BadRequestError",
                                     status_code=HTTPStatus.BAD_REQUEST, param="model")

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._vllm_t2l_ids = {}  # content id -> engine id
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
            if names.is_t2l_name(lora_name):
                return await _resolve_t2l(self, resolver, lora_name, bad_request)
            return await original_resolve(self, lora_name)
        finally:
            _drop_lock(self, lora_name)
            _count(self)

    @functools.wraps(original_show)
    async def show_available_models(self):
        listed = await original_show(self)
        if resolver.cache is not None:
            root = str(resolver.cache.root)
            listed.data = [card for card in listed.data if not (card.root or "").startswith(root)]
        return listed

    @functools.wraps(original_load)
    async def load_lora_adapter(self, request, base_model_name=None):
        if reserved(request.lora_name or ""):
            return bad_request("adapter names starting with 't2l' are reserved for generated adapters")
        try:
            return await original_load(self, request, base_model_name)
        finally:
            _drop_lock(self, request.lora_name)
            _count(self)

    @functools.wraps(original_unload)
    async def unload_lora_adapter(self, request):
        if reserved(request.lora_name or ""):
            return bad_request("generated adapters are unloaded by the adapter cache, not by name")
        try:
            return await original_unload(self, request)
        finally:
            _drop_lock(self, request.lora_name)
            _count(self)

    @functools.wraps(original_record)
    def record(self, scheduler_stats, *args, **kwargs):
        gauge = getattr(self, "gauge_lora_info", None)
        if gauge is not None and scheduler_stats is not None:
            gauge.clear()  # one series (the current adapters), not one per combination ever seen
        return original_record(self, scheduler_stats, *args, **kwargs)

    OpenAIServingModels.__init__ = __init__
    OpenAIServingModels.resolve_lora = resolve_lora
    OpenAIServingModels.show_available_models = show_available_models
    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter
    PrometheusStatLogger.record = record
    OpenAIServingModels._vllm_t2l = True


async def _resolve_t2l(models, resolver: T2LResolver, lora_name: str, bad_request):
    """Generate or find the adapter, load it into the engine under its content id, register the name."""
    from vllm.lora.request import LoRARequest

    for _ in range(2):  # a second pass only if the adapter was evicted while the engine loaded it
        try:
            key, path, hit = await resolver.resolve(lora_name)
        except AdapterRequestError as e:
            return bad_request(str(e))
        known = models.lora_requests.get(lora_name)
        if known is not None:  # registered by a concurrent request for the same name
            return known
        ids = models._vllm_t2l_ids
        if key not in ids:
            _prune_ids(ids, resolver)
            ids[key] = models.lora_id_counter.inc(1)
        request = LoRARequest(lora_name=adapter_name(key), lora_int_id=ids[key], lora_path=str(path),
                              base_model_name=models.model_config.model)
        try:
            await models.engine_client.add_lora(request)
        except Exception as e:
            log.warning("vllm-t2l: vLLM could not load adapter %s (%s); the next request regenerates it", key, e)
            resolver.cache.forget(key)
            return bad_request(f"the adapter for {shown(lora_name)!r} could not be loaded; retry to regenerate it")
        if resolver.cache.register(key, lora_name):
            models.lora_requests[lora_name] = request
            log.info("vllm-t2l: serving adapter %s (%s)", key, "cached" if hit else "generated")
            return request
    return bad_request("the adapter was evicted while it loaded; the cache is too small for the traffic")


def _prune_ids(ids: dict[str, int], resolver: T2LResolver) -> None:
    """Keep engine ids only for adapters the cache still holds (entries or within their grace period)."""
    cache = resolver.cache
    if len(ids) > 2 * (cache.limits.max_adapters + len(cache.retired)) + 16:
        for key in [k for k in ids if k not in cache.entries and k not in cache.retired]:
            del ids[key]


def _drop_lock(models, lora_name: str) -> None:
    """Forget vLLM's per-name lock once nobody holds or waits for it (vLLM keeps one per name forever)."""
    lock = models.lora_resolver_lock.get(lora_name)
    if lock is not None and not lock.locked() and not getattr(lock, "_waiters", None):
        del models.lora_resolver_lock[lora_name]


def _count(models) -> None:
    metrics.REGISTERED_NAMES.set(len(models.lora_requests))
    metrics.RESOLVER_LOCKS.set(len(models.lora_resolver_lock))


def _unregister(models, key: str, lora_names: set[str]) -> None:
    """Forget evicted names; the next request for one resolves (and regenerates) it again.

    vLLM's engine keeps the weights in its own LRU (--max-cpu-loras) until they are pushed out.
    """
    for name in lora_names:
        models.lora_requests.pop(name, None)
    _count(models)
