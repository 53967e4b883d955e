"""Decode step cost of one adapter: milliseconds per output token for one request at a time, base model
against one warm `t2l:` adapter, alternating in one server.

    python -m benchmarks.decode_step [--rounds 3] [--tokens 128] [--out benchmarks/results]

This isolates what the LoRA path adds to every decode step (the warm-throughput target rests on it), without
the batching and scheduling effects of `benchmarks.throughput`. Each request decodes exactly `--tokens`
tokens greedily (`min_tokens` = `max_tokens`), so ms per token is the request's time over its tokens;
the one prefill is included and is the same for both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx

from benchmarks import report
from benchmarks.server import base_model_name
from vllm_t2l.launch import ServerProcess

PROMPT = "Tell me a long story about a ship."
ADAPTER = "t2l:Speak like a pirate."


def ms_per_token(url: str, model: str, tokens: int) -> float:
    started = time.perf_counter()
    r = httpx.post(url, json={"model": model, "prompt": PROMPT, "max_tokens": tokens, "min_tokens": tokens,
                              "temperature": 0}, timeout=600)
    r.raise_for_status()
    return (time.perf_counter() - started) / tokens * 1e3


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    with ServerProcess(["--max-loras", "4"], log=Path(args.out) / "logs" / "decode_step.log").start() as server:
        url = f"{server.base_url}/v1/completions"
        models = {"base": base_model_name(server), "adapter": ADAPTER}
        for model in models.values():  # warm-up: the adapter's miss, and both paths once
            ms_per_token(url, model, 8)
        rounds = [{name: ms_per_token(url, model, args.tokens) for name, model in models.items()}
                  for _ in range(args.rounds)]
    ratios = [r["adapter"] / r["base"] for r in rounds]
    rows = [(i + 1, r["base"], r["adapter"], f"{q:.2f}x") for i, (r, q) in enumerate(zip(rounds, ratios))]
    rows.append(("median", statistics.median(r["base"] for r in rounds),
                 statistics.median(r["adapter"] for r in rounds), f"{statistics.median(ratios):.2f}x"))
    ctx = report.context("benchmarks.decode_step")
    md = "\n".join([f"# Decode step: one request, base vs one adapter (`{ctx['command']}`)", "",
                    f"{args.tokens} greedy tokens per request, rounds alternate base and adapter in one server.", "",
                    *report.table(["round", "base ms/token", "adapter ms/token", "adapter / base"], rows)])
    report.write(Path(args.out), "decode_step", md, {"context": ctx, "tokens": args.tokens, "rounds": rounds,
                                                       "ratios": ratios})
    print(md)


if __name__ == "__main__":
    main()
