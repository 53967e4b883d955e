"""Decode step cost of one adapter: milliseconds per output token for one request at a time, base model
against one warm `t2l:` adapter, alternating in one server, and plain vLLM (no LoRA) in its own server.

    python -m benchmarks.decode_step [--rounds 3] [--tokens 128] [--out benchmarks/results]

This isolates what the LoRA path adds to every decode step, without the batching and scheduling effects of
`benchmarks.throughput`. Each request decodes exactly `--tokens` tokens greedily (`min_tokens` = `max_tokens`),
so ms per token is the request's time over its tokens; the one prefill is included and is the same for all.
Plain vLLM (`python -m vllm.entrypoints.openai.api_server`, same model, no LoRA flags, no plugins) runs first,
in a second server that is stopped before `vllm-t2l serve` starts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx

from benchmarks import report
from benchmarks.server import base_model_name, plain_server
from vllm_t2l.launch import ServerProcess

PROMPT = "Tell me a long story about a ship."
ADAPTER = "t2l:Speak like a pirate."


def ms_per_token(url: str, model: str, tokens: int) -> float:
    started = time.perf_counter()
    r = httpx.post(url, json={"model": model, "prompt": PROMPT, "max_tokens": tokens, "min_tokens": tokens,
                              "temperature": 0}, timeout=600)
    r.raise_for_status()
    return (time.perf_counter() - started) / tokens * 1e3


def timed_rounds(server: ServerProcess, models: dict[str, str], rounds: int, tokens: int) -> list[dict[str, float]]:
    """Warm every model once (an adapter's miss included), then ``rounds`` rounds alternating them."""
    url = f"{server.base_url}/v1/completions"
    for model in models.values():
        ms_per_token(url, model, 8)
    return [{name: ms_per_token(url, model, tokens) for name, model in models.items()} for _ in range(rounds)]


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def main() -> None:
    from vllm_t2l.models import prepare_default_model

    args = build_parser().parse_args()
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with plain_server(prepare_default_model(), logs / "decode_step.plain.log").start() as server:
        plain = timed_rounds(server, {"plain": base_model_name(server)}, args.rounds, args.tokens)
    with ServerProcess(["--max-loras", "4"], log=logs / "decode_step.log").start() as server:
        ours = timed_rounds(server, {"base": base_model_name(server), "adapter": ADAPTER}, args.rounds, args.tokens)
    rounds = [p | o for p, o in zip(plain, ours)]
    plain_ms = statistics.median(r["plain"] for r in rounds)
    ratios = [r["adapter"] / r["base"] for r in rounds]
    rows = [(i + 1, r["plain"], r["base"], r["adapter"], f"{r['adapter'] / r['plain']:.2f}x", f"{q:.2f}x")
            for i, (r, q) in enumerate(zip(rounds, ratios))]
    med = {k: statistics.median(r[k] for r in rounds) for k in ("plain", "base", "adapter")}
    rows.append(("median", med["plain"], med["base"], med["adapter"], f"{med['adapter'] / plain_ms:.2f}x",
                 f"{statistics.median(ratios):.2f}x"))
    ctx = report.context("benchmarks.decode_step")
    md = "\n".join([f"# Decode step: one request, plain vLLM vs base vs one adapter (`{ctx['command']}`)", "",
                    f"{ctx['date']}, {ctx['cpus']} CPUs, load average {ctx['load_average_at_end']} at the end. "
                    f"{args.tokens} greedy tokens per request; base and adapter alternate in one `vllm-t2l serve` "
                    "server; plain vLLM (no LoRA) ran before it in its own server. Row i pairs the i-th request of "
                    "each; plain's own rounds are not interleaved with the others, so its column carries the drift "
                    "of the machine's load between the two servers.", "",
                    *report.table(["round", "plain ms/token", "base ms/token", "adapter ms/token", "adapter / plain",
                                   "adapter / base"], rows),
                    "", f"Base in the plugin's server over plain vLLM: {med['base'] / plain_ms:.2f}x the time per "
                        "token (median)."])
    report.write(Path(args.out), "decode_step", md, {"context": ctx, "tokens": args.tokens, "rounds": rounds,
                                                       "ratios": ratios,
                                                       "vs_plain": {k: med[k] / plain_ms for k in med}})
    print(md)


if __name__ == "__main__":
    main()
