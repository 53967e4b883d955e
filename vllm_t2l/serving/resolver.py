"""The LoRA resolver vLLM consults for an unknown ``model`` name: name -> spec -> cache -> LoRARequest."""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from vllm_t2l import codes, names
from vllm_t2l.generator import Generator
from vllm_t2l.names import AdapterNameError, AdapterSpec, NameLimits
from vllm_t2l.serving import metrics, worker_load
from vllm_t2l.serving.cache import AdapterCache, CacheLimits

log = logging.getLogger("vllm.t2l")  # under vLLM's configured logger


@dataclass
class Settings:
    """Every knob of the serving layer; read from ``VLLM_T2L_<FIELD>`` environment variables."""

    checkpoint: str = ""  # empty: the embedded default checkpoint
    embedder: str = ""  # empty: the path recorded in the checkpoint, else the embedded MiniLM
    trust_embedder_code: bool = False  # let the embedder run its own modelling code (gte-large-en-v1.5 ships some)
    catalog: str = ""  # JSON file {name: description} for t2l:@name
    cache_dir: str = ""  # empty: <VLLM_T2L_HOME>/adapters
    cache_max_adapters: int = 256
    cache_max_bytes: int = 2 << 30
    cache_grace_s: float = 60.0
    max_chars: int = 2000
    max_terms: int = 8
    max_abs_weight: float = 2.0
    max_strength: float = 4.0
    max_batch: int = 64  # descriptions per hypernetwork forward pass
    device: str = ""  # empty: cuda when available, else cpu
    # On CPU, vLLM binds its worker to every core but one, which it leaves to the API server (where this
    # resolver runs); the worker polls on its cores for a second after each step, so a second thread here
    # would share a core with it. 0 keeps torch's default.
    cpu_threads: int = 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(f"VLLM_T2L_{f.name.upper()}")
            if raw is not None:
                kind = type(getattr(cls, f.name))
                try:
                    value = _flag(raw) if kind is bool else kind(raw)
                    if kind in (int, float) and not (math.isfinite(value) and value >= 0):
                        raise ValueError
                except ValueError:
                    what = f"a non-negative finite {kind.__name__}" if kind in (int, float) else f"a valid {f.type}"
                    raise ValueError(f"VLLM_T2L_{f.name.upper()}={raw!r} is not {what}") from None
                values[f.name] = value
        return cls(**values)

    @property
    def limits(self) -> NameLimits:
        return NameLimits(self.max_chars, self.max_terms, self.max_abs_weight, self.max_strength)


def _flag(raw: str) -> bool:
    """An on/off environment value; bool("0") would read as on."""
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


class AdapterRequestError(Exception):
    """Turned into an HTTP 400 with this message by the serving hooks."""


ADAPTER_PREFIX = "t2l-"  # the name vLLM's engine, metrics and responses know a generated adapter by


def adapter_name(key: str) -> str:
    """What vLLM's engine sees instead of the description: the content id (a hash), nothing a client typed."""
    return ADAPTER_PREFIX + key


def shown(name: str, limit: int = 40) -> str:
    """A client's own name as an error message may quote it: cut to ``limit`` characters."""
    return name if len(name) <= limit else name[:limit] + "..."


def _cache_problem(e: BaseException) -> str | None:
    """The message for a cache disk that refuses writes, or None for any other error."""
    while e is not None:
        if isinstance(e, OSError):
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return "the adapter cache is read-only"
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                return "the adapter cache is full (no space left on its disk)"
        e = e.__cause__ or e.__context__
    return None


class T2LResolver(LoRAResolver):
    """Generates an adapter the first time a description is asked for; later asks hit the cache.

    Everything heavy is created lazily, so the plugin costs nothing in vLLM's engine processes.
    Concurrent misses are gathered into one hypernetwork batch, off the event loop.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.generator: Generator | None = None
        self.cache: AdapterCache | None = None
        self.catalog: dict[str, str] = {}
        self.max_lora_rank: int | None = None
        self.base_model: str = ""
        self.basis: Path | None = None  # Zhyper checkpoints: misses hand over codes (see vllm_t2l.codes)
        self.on_evict = None  # set by the hooks: (content id, names) -> unregister them from vLLM
        self._queue: list[tuple[AdapterSpec, Path, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    # ---- start-up --------------------------------------------------------------------------

    def start(self, served_config: dict, base_model: str, max_lora_rank: int | None) -> None:
        """Load checkpoint, embedder, catalog and cache; refuse a checkpoint that does not fit."""
        import torch

        from vllm_t2l.hypernet import BaseShapes
        from vllm_t2l.models import DEFAULT_CHECKPOINT, home

        s = self.settings
        device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu" and s.cpu_threads:
            torch.set_num_threads(s.cpu_threads)
        self.generator = Generator.load(s.checkpoint or DEFAULT_CHECKPOINT, s.embedder or None, device,
                                        trust_embedder_code=s.trust_embedder_code)
        ckpt = self.generator.checkpoint
        served = BaseShapes.from_config(served_config, ckpt.config.target_modules, name=base_model)
        ckpt.check_base(served)
        if max_lora_rank is not None and ckpt.config.rank > max_lora_rank:  # strength 1 must fit; see resolve
            raise ValueError(f"checkpoint rank {ckpt.config.rank} exceeds --max-lora-rank {max_lora_rank}")
        self.catalog = names.load_catalog(s.catalog) if s.catalog else {}
        root = Path(s.cache_dir) if s.cache_dir else home() / "adapters"
        by_codes = self.generator.zhyper and worker_load.installed()
        # One folder per hand-off kind: a vLLM that cannot read codes never adopts codes folders.
        self.cache = AdapterCache(root / ckpt.id / ("codes" if by_codes else "weights"),
                                  CacheLimits(s.cache_max_adapters, s.cache_max_bytes, s.cache_grace_s),
                                  self._evicted)
        self.max_lora_rank, self.base_model = max_lora_rank, base_model
        if by_codes:
            self.basis = self.cache.root / codes.BASIS_FILE
            try:
                codes.save_basis(self.cache.root, ckpt.hypernet)
            except OSError as e:  # written with the first adapter instead; base requests work meanwhile
                if not _cache_problem(e):
                    raise
                log.error("vllm-t2l: %s (%s: %s); t2l: requests fail until it is writable",
                          _cache_problem(e), self.cache.root, e)
        self._update_gauges()
        state = "TRAINED" if ckpt.trained else "UNTRAINED (adapters will not follow descriptions)"
        log.info("vllm-t2l: %s checkpoint %s (%s, id %s), embedder %s on %s (torch threads: %d), %d catalog names, "
                 "cache %s", state, s.checkpoint or DEFAULT_CHECKPOINT, ckpt.config.arch, ckpt.id,
                 ckpt.embedder.name, device, torch.get_num_threads(), len(self.catalog), self.cache.root)

    def _evicted(self, key: str, registered: set[str]) -> None:
        if self.on_evict:
            self.on_evict(key, registered)

    def _update_gauges(self) -> None:
        metrics.ADAPTERS_RESIDENT.set(len(self.cache.entries))
        metrics.CACHE_BYTES.set(self.cache.nbytes)

    # ---- the resolver API --------------------------------------------------------------------

    async def resolve(self, lora_name: str) -> tuple[str, Path, bool]:
        """(content id, folder, hit) for a ``t2l:`` name; AdapterRequestError with a message for the client."""
        if self.generator is None:
            raise AdapterRequestError("vllm-t2l is not started: the server was not launched through "
                                      "`vllm-t2l serve` or the plugin hooks failed to load")
        try:
            spec = names.parse(lora_name, self.catalog, self.settings.limits)
            rank = self.generator.rank_of(spec)
            if self.max_lora_rank is not None and rank > self.max_lora_rank:
                why = "strength 1" if self.generator.zhyper else "fewer terms, mode [emb]"
                raise AdapterNameError(f"this adapter needs LoRA rank {rank}, above the server's "
                                       f"--max-lora-rank {self.max_lora_rank}; use {why}, "
                                       "or a larger --max-lora-rank")
        except AdapterNameError as e:
            metrics.REJECTED_NAMES.inc()
            raise AdapterRequestError(f"bad adapter name: {e}") from None
        key = spec.content_id(self.generator.id)
        try:
            path, hit = await self.cache.get(key, lambda tmp: self._generate(spec, tmp))
        except Exception as e:
            metrics.GENERATION_ERRORS.inc()
            problem = _cache_problem(e)
            if problem:
                log.error("vllm-t2l: adapter %s not written: %s (%s: %s)", key, problem, self.cache.root, e)
                raise AdapterRequestError(f"{problem}; base model requests still work") from None
            log.exception("vllm-t2l: generation of adapter %s failed", key)
            raise AdapterRequestError("adapter generation failed (the hypernetwork or writing the adapter "
                                      "raised an error); see the server log") from None
        (metrics.CACHE_HITS if hit else metrics.CACHE_MISSES).inc()
        self._update_gauges()
        log.debug("vllm-t2l: adapter %s %s", key, "hit" if hit else "generated")
        return key, path, hit

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if not names.is_t2l_name(lora_name):
            return None
        key, path, _ = await self.resolve(lora_name)
        return LoRARequest(lora_name=adapter_name(key), lora_int_id=1, lora_path=str(path),
                           base_model_name=base_model_name)

    # ---- batched generation ----------------------------------------------------------------

    async def _generate(self, spec: AdapterSpec, folder: Path) -> None:
        """Queue one adapter; misses that arrive together share one hypernetwork forward pass."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((spec, folder, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[: self.settings.max_batch]
            del self._queue[: len(batch)]
            start = time.perf_counter()
            try:
                await asyncio.to_thread(self._write, [(s, f) for s, f, _ in batch])
            except Exception as e:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            metrics.GENERATION_SECONDS.observe(time.perf_counter() - start)
            for *_, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    def _write(self, jobs: list[tuple[AdapterSpec, Path]]) -> None:
        timings: dict[str, float] = {}
        specs = [spec for spec, _ in jobs]
        c = self.generator.checkpoint.config
        if self.basis and not self.basis.exists():
            codes.save_basis(self.cache.root, self.generator.checkpoint.hypernet)
        made = self.generator.codes(specs, timings) if self.basis else self.generator.generate(specs, timings)
        start = time.perf_counter()
        for spec, (_, folder), adapter in zip(specs, jobs, made):
            meta = {"checkpoint": self.generator.id, "descriptions": spec.descriptions, "weights": spec.weights,
                    "mode": spec.mode, "strength": spec.strength}
            if self.basis:
                codes.save(folder, adapter, self.basis, self.base_model, c.alpha_for(self.generator.rank_of(spec)),
                           c.use_rslora, meta)
            else:
                adapter.save_peft(folder, self.base_model, meta)
        timings["write"] = time.perf_counter() - start
        for stage, seconds in timings.items():
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
