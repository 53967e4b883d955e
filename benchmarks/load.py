"""Load: many requests at once over new descriptions and the base model; no error, base answers unchanged.

    python -m benchmarks.load [--requests 500] [--descriptions 200] [--concurrency 32] [--max-tokens 8]

Every description is new to the server (a fresh suffix each run), each asked ``requests * share``
times in a shuffled order mixed with base-model requests, ``--concurrency`` in flight. Passes when no
request fails, every base answer equals the base model's answer alone (tokens; log-probabilities
within 2e-3), and every description gets the same answer each time it is asked.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks import report
from benchmarks.server import base_model_name, descriptions, http_client, keep_log, tree_rss
from vllm_t2l.launch import ServerProcess

QUERY = [{"role": "user", "content": "Name three colours."}]


async def ask(http, model: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": QUERY, "max_tokens": max_tokens, "temperature": 0, "logprobs": True,
            "top_logprobs": 0, "return_tokens_as_token_ids": True}
    start = time.perf_counter()
    try:
        resp = await http.post("/v1/chat/completions", json=body)
    except Exception as e:  # any transport error is a failed request
        return {"error": f"{type(e).__name__}: {e}", "latency_s": time.perf_counter() - start}
    out = {"latency_s": time.perf_counter() - start}
    if resp.status_code != 200:
        return out | {"error": f"HTTP {resp.status_code}: {resp.text[:300]}"}
    content = resp.json()["choices"][0]["logprobs"]["content"]
    return out | {"tokens": [t["token"] for t in content], "logprobs": [t["logprob"] for t in content]}


async def run(server: ServerProcess, args) -> dict:
    tag = uuid.uuid4().hex[:8]
    descs = [f"{d} (load {tag})" for d in descriptions(args.descriptions)]
    adapter_jobs = [("t2l:" + descs[i % len(descs)]) for i in range(round(args.requests * args.adapter_share))]
    base = base_model_name(server)
    jobs = adapter_jobs + [base] * (args.requests - len(adapter_jobs))
    random.Random(args.seed).shuffle(jobs)
    limit = asyncio.Semaphore(args.concurrency)
    async with http_client(server) as http:
        alone = await ask(http, base, args.max_tokens)
        if "error" in alone:
            raise RuntimeError(f"base alone: {alone['error']}")
        rss_before = tree_rss(server.pid)

        async def one(model: str) -> dict:
            async with limit:
                return {"model": model} | await ask(http, model, args.max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(m) for m in jobs))
        wall = time.perf_counter() - start
    errors = [r for r in results if "error" in r]
    base_rows = [r for r in results if r["model"] == base and "error" not in r]
    base_diffs = [r for r in base_rows if r["tokens"] != alone["tokens"]
                  or max(abs(a - b) for a, b in zip(r["logprobs"], alone["logprobs"])) > 2e-3]
    answers: dict[str, set] = {}
    for r in results:
        if r["model"] != base and "error" not in r:
            answers.setdefault(r["model"], set()).add(tuple(r["tokens"]))
    unstable = [m for m, a in answers.items() if len(a) > 1]
    return {"requests": len(jobs), "adapter_requests": len(adapter_jobs), "descriptions": len(descs),
            "base_requests": len(jobs) - len(adapter_jobs), "concurrency": args.concurrency, "wall_s": wall,
            "errors": len(errors), "first_errors": [e["error"] for e in errors[:5]],
            "base_answers_differing": len(base_diffs), "descriptions_with_two_answers": len(unstable),
            "latency_s": report.stats([r["latency_s"] for r in results]),
            "rss_mb": {"before": rss_before / 2**20, "after": tree_rss(server.pid) / 2**20},
            "misses": server.metric("vllm_t2l:cache_misses_total")}


def markdown(s: dict, ctx: dict, flags: list[str]) -> str:
    ok = s["errors"] == 0 and s["base_answers_differing"] == 0 and s["descriptions_with_two_answers"] == 0
    lines = ["# Load: new descriptions and base requests at once", "",
             f"`{ctx['command']}` ({ctx['date']}, {ctx['cpus']} CPUs, load average {ctx['load_average_at_end']} "
             f"at the end). Server flags `{' '.join(flags)}`.", "",
             f"- {s['requests']} requests ({s['adapter_requests']} over {s['descriptions']} new descriptions, "
             f"{s['base_requests']} base), {s['concurrency']} at a time, in {s['wall_s']:.1f} s: "
             f"**{s['errors']} errors**, **{s['base_answers_differing']} base answers differing** from base alone, "
             f"{s['descriptions_with_two_answers']} descriptions answered two ways; cache misses "
             f"{s['misses']:.0f}. **{'PASS' if ok else 'FAIL'}**.",
             f"- Latency p50 {s['latency_s']['p50']:.2f} s, p95 {s['latency_s']['p95']:.2f} s; server RSS "
             f"{s['rss_mb']['before']:.0f} MiB before, {s['rss_mb']['after']:.0f} MiB after."]
    if s["first_errors"]:
        lines += ["", "First errors:", "", *(f"- {e}" for e in s["first_errors"])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--descriptions", type=int, default=200)
    parser.add_argument("--adapter-share", type=float, default=0.8, help="share of requests naming a description")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    parser.add_argument("server_args", nargs="*", help="extra flags for `vllm-t2l serve` (after --)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    flags = ["--max-loras", "4", "--max-num-seqs", "32", *args.server_args]
    with tempfile.TemporaryDirectory(prefix="t2l-load-") as tmp:
        server = ServerProcess([*flags, "--cache-dir", str(Path(tmp) / "t2l")], Path(tmp) / "server.log")
        try:
            with server:
                s = asyncio.run(run(server, args))
        finally:
            keep_log(server, args.out, "load")
    ctx = report.context("benchmarks.load")
    path = report.write(args.out, "load", markdown(s, ctx, flags),
                        {"context": ctx, "server_flags": flags, "summary": s})
    print(path.read_text())
    ok = s["errors"] == 0 and s["base_answers_differing"] == 0 and s["descriptions_with_two_answers"] == 0
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
