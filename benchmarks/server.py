"""Shared code of the serving benchmarks: the real server, streamed requests timed per token, adapters
written ahead of time, descriptions from the project's data, and the server's memory.

The server itself is started with ``vllm_t2l.launch.ServerProcess`` (the tests use it too).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from vllm_t2l.launch import ServerProcess, parse_metrics

STAGES = ("embed", "hypernet", "write")


@dataclass
class Timing:
    """One streamed chat completion, in seconds from the moment it was sent."""

    ttft: float = math.nan  # first token with text
    latency: float = math.nan  # last byte of the stream
    itl: list[float] = field(default_factory=list)  # gaps between consecutive streamed tokens
    tokens: int = 0  # completion tokens, as the server counted them
    prompt_tokens: int = 0
    error: str = ""


def http_client(server: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, timeout=httpx.Timeout(600.0),
                             limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))


def chat_messages(query: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]


async def stream_chat(http: httpx.AsyncClient, model: str, messages: list[dict[str, str]], max_tokens: int,
                      fixed_length: bool = True) -> Timing:
    """Send one streamed chat completion (greedy) and time its tokens as they arrive.

    ``fixed_length`` asks for exactly ``max_tokens`` tokens (ignore_eos, min_tokens), so that every
    setup produces the same amount of work.
    """
    body: dict = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                  "stream": True, "stream_options": {"include_usage": True}}
    if fixed_length:
        body |= {"ignore_eos": True, "min_tokens": max_tokens}
    out, arrivals = Timing(), []
    start = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = str(chunk["error"])[:300]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    arrivals.append(time.perf_counter())
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                    out.prompt_tokens = chunk["usage"]["prompt_tokens"]
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.latency = time.perf_counter() - start
    if arrivals:
        out.ttft = arrivals[0] - start
        out.itl = [b - a for a, b in zip(arrivals, arrivals[1:])]
    elif not out.error:
        out.error = "no tokens"
    return out


def plain_server(model: str | Path, log: Path, flags: Sequence[str] = ()) -> ServerProcess:
    """The same model in plain vLLM: ``python -m vllm.entrypoints.openai.api_server`` with the flags
    `vllm-t2l serve` adds that are not about LoRA (host, context length, CPU dtype and KV cache), no LoRA
    flags, and no plugins (``VLLM_PLUGINS`` empty), which is what a user runs without this project."""
    import torch

    from vllm_t2l.cli import CPU_DEFAULTS, SERVE_DEFAULTS

    defaults = [(f, v) for f, v in SERVE_DEFAULTS + ([] if torch.cuda.is_available() else CPU_DEFAULTS)
                if "lora" not in f]
    args = ["--model", str(model), *[x for f, v in defaults for x in (f, v) if x is not None], *flags]
    env = {"VLLM_PLUGINS": ""} | ({} if torch.cuda.is_available() else {"VLLM_CPU_KVCACHE_SPACE": os.environ.get(
        "VLLM_CPU_KVCACHE_SPACE", "2")})
    return ServerProcess(args, log, env, command=[sys.executable, "-m", "vllm.entrypoints.openai.api_server"])


def checked(t: Timing, what: str) -> Timing:
    if t.error:
        raise RuntimeError(f"{what}: {t.error}")
    return t


def base_model_name(server: ServerProcess) -> str:
    """The served base model's name (the `model` of plain requests)."""
    return json.loads(server.get("/v1/models"))["data"][0]["id"]


def t2l_counters(server: ServerProcess) -> dict[str, float]:
    """Sums of the t2l stage histograms and the cache counters, read from /metrics in one request."""
    out = dict.fromkeys([*STAGES, "generation", "misses", "hits"], 0.0)
    for name, labels, value in parse_metrics(server.get("/metrics")):
        if name == "vllm_t2l:stage_seconds_sum" and labels.get("stage") in STAGES:
            out[labels["stage"]] = value
        elif name == "vllm_t2l:generation_seconds_sum":
            out["generation"] = value
        elif name == "vllm_t2l:cache_misses_total":
            out["misses"] = value
        elif name == "vllm_t2l:cache_hits_total":
            out["hits"] = value
    return out


def descriptions(n: int) -> list[str]:
    """``n`` distinct descriptions from the project's data: the first wording of every behaviour, then the
    second, and so on; numbered variants beyond the 2,296 the data holds."""
    from vllm_t2l.train import data

    prompts = data.load_prompts()
    out = [p["descriptions"][j] for j in range(max(len(p["descriptions"]) for p in prompts))
           for p in prompts if j < len(p["descriptions"])]
    return [out[i % len(out)] + (f" (variant {i // len(out)})" if i >= len(out) else "") for i in range(n)]


def long_descriptions(n: int, tokens: int, tokenizer_path: str | Path) -> list[str]:
    """``n`` descriptions of exactly ``tokens`` tokens: behaviour i's wordings, then the next behaviours',
    cut at ``tokens``."""
    from transformers import AutoTokenizer

    from vllm_t2l.train import data

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    prompts = data.load_prompts()
    out = []
    for i in range(n):
        ids: list[int] = []
        j = i
        while len(ids) < tokens:
            ids += tok.encode(" ".join(prompts[j % len(prompts)]["descriptions"]) + " ", add_special_tokens=False)
            j += 1
        out.append(tok.decode(ids[:tokens]).strip())
    return out


def adapter_name(description: str, strength: float = 1.0) -> str:
    """The served name of one description's adapter at ``strength``."""
    return f"t2l:{description}" if strength == 1 else f"t2l[strength={strength:g}]:{description}"


def write_adapters(adapters: dict[str, str], root: Path, base_model: str, batch: int = 64,
                   checkpoint: str | Path | None = None, sidecar: bool = True,
                   strength: float = 1.0) -> dict[str, Path]:
    """``{name: description}`` -> PEFT folders ``root/<name>``, as `vllm-t2l generate` writes them, with the
    server's checkpoint (default: the embedded one), at ``strength``. Without the ``sidecar`` (our metadata
    file) they are plain PEFT folders, which vLLM's workers read with vLLM's own loader (see
    ``serving.worker_load``)."""
    from vllm_t2l.generator import Generator
    from vllm_t2l.models import DEFAULT_CHECKPOINT
    from vllm_t2l.names import spec_from_parts

    gen = Generator.load(checkpoint or DEFAULT_CHECKPOINT)
    items = list(adapters.items())
    paths = {}
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        specs = [spec_from_parts([d], strength=strength) for _, d in chunk]
        for (name, _), spec, lora in zip(chunk, specs, gen.generate(specs)):
            paths[name] = lora.save_peft(root / name, base_model, {
                "checkpoint": gen.id, "descriptions": spec.descriptions, "weights": spec.weights,
                "mode": spec.mode, "strength": spec.strength} if sidecar else None)
    return paths


def rss_by_process(pid: int) -> dict[str, int]:
    """Resident bytes of a process and all its descendants (vLLM's API server and engine processes), summed
    by process name, so a benchmark can say which of them grows."""
    import psutil

    root = psutil.Process(pid)
    out: dict[str, int] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = "api server" if proc.pid == pid else proc.name()
            out[name] = out.get(name, 0) + proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    return sum(rss_by_process(pid).values())


def keep_log(server: ServerProcess, out: Path, name: str) -> None:
    """Copy the server's log next to the results (the server ran in a temporary folder)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    shutil.copy(server.log, out / "logs" / f"{name}.server.log")
