"""How the serving cost of LoRA grows with the adapters' rank and target modules, against plain vLLM.

    python -m benchmarks.lora_cost [--ranks 8,16,32] [--targets qv,all] [--k 16] [--max-tokens 64]
                                   [--min-requests 32] [--out DIR]

For each (rank, targets): one `vllm-t2l serve` server started with ``--max-lora-rank <rank>`` and
``--lora-target-modules <targets>`` (vLLM sizes its LoRA buffers and wraps layers by those, so each pair
needs its own engine), serving K distinct random adapters of that rank and those targets as
``--lora-modules``; K clients in a closed loop, each request exactly ``--max-tokens`` tokens, as in
`benchmarks.throughput`. Plain vLLM (no LoRA, no plugins) serves the same load first, in its own server.
Targets: ``qv`` = q_proj, v_proj (the shipped checkpoints'); ``all`` = the seven projections of a decoder
layer. Random adapters cost what trained ones do (the products do not depend on the values). Writes
lora_cost.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.server import base_model_name, keep_log, plain_server
from benchmarks.throughput import Workload, measure
from vllm_t2l.launch import ServerProcess

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"qv": ("q_proj", "v_proj"), "all": SEVEN}


def random_adapters(root: Path, model: Path, k: int, rank: int, targets: tuple[str, ...]) -> dict[str, Path]:
    """K PEFT folders (``static-<i>``, the names `benchmarks.throughput` asks for) of random rank-``rank``
    adapters on ``targets``."""
    from vllm_t2l.hypernet import BaseShapes
    from vllm_t2l.lora import LoRAWeights

    shapes = BaseShapes.from_config(model, targets)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(k):
        a = {m: torch.randn(shapes.n_layers, rank, d_in, generator=gen) / d_in ** 0.5
             for m, (d_in, _) in shapes.modules.items()}
        b = {m: torch.randn(shapes.n_layers, d_out, rank, generator=gen) * 1e-3
             for m, (_, d_out) in shapes.modules.items()}
        out[f"static-{i}"] = LoRAWeights(a, b, alpha=16.0, use_rslora=True).save_peft(root / f"static-{i}", str(model))
    return out


def run(server: ServerProcess, setup: str, args) -> dict:
    """One cell: K clients on ``setup`` ("plain", "base", or "static": the K adapters)."""
    work = Workload(base_model_name(server), [""] * args.k, [""] * args.k)
    return asyncio.run(measure(server, work, [args.k], [setup], args))[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--targets", default="qv,all")
    parser.add_argument("--k", type=int, default=16, help="distinct adapters in flight")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=32)
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    parser.add_argument("server_args", nargs="*", help="extra vLLM flags for every server (after --)")
    return parser


def main() -> None:
    from vllm_t2l.models import prepare_default_model

    args = build_parser().parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = args.targets.split(",")
    model = prepare_default_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="t2l-lora-cost-") as tmp:
        srv = plain_server(model, Path(tmp) / "plain.log", args.server_args)
        try:
            with srv:
                plain = run(srv, "plain", args)
        finally:
            keep_log(srv, args.out, "lora_cost-plain")
        print(f"plain: {plain['tokens_per_s']:.1f} tok/s", flush=True)
        for t in targets:
            for r in ranks:
                folders = random_adapters(Path(tmp) / f"{t}-{r}", model, args.k, r, TARGETS[t])
                flags = ["--max-lora-rank", str(r), "--max-loras", str(args.k), "--lora-target-modules",
                         *TARGETS[t], "--lora-modules", *(f"{name}={p}" for name, p in folders.items()),
                         *args.server_args]
                server = ServerProcess(flags, Path(tmp) / f"{t}-{r}.log")
                try:
                    with server:
                        cells = {s: run(server, s, args) for s in ("base", "static")}
                finally:
                    keep_log(server, args.out, f"lora_cost-{t}-r{r}")
                row = {"targets": t, "rank": r, "k": args.k, "plain_tokens_per_s": plain["tokens_per_s"],
                       **{f"{s}_tokens_per_s": c["tokens_per_s"] for s, c in cells.items()},
                       **{f"{s}_errors": c["errors"] for s, c in cells.items()}}
                row["base_x_plain"] = row["base_tokens_per_s"] / plain["tokens_per_s"]
                row["adapters_x_plain"] = row["static_tokens_per_s"] / plain["tokens_per_s"]
                row["adapters_x_base"] = row["static_tokens_per_s"] / row["base_tokens_per_s"]
                rows.append(row)
                print(f"{t} r={r}: base {row['base_x_plain']:.2f}x plain, {args.k} adapters "
                      f"{row['adapters_x_plain']:.2f}x plain ({row['adapters_x_base']:.2f}x base)", flush=True)
    ctx = report.context("benchmarks.lora_cost")
    md = ["# LoRA serving cost by rank and target modules", "",
          f"`{ctx['command']}` ({ctx['date']}, {ctx['cpus']} CPUs, load average {ctx['load_average_at_end']} at "
          f"the end). {args.k} distinct adapters in flight (K clients, each request {args.max_tokens} tokens); "
          f"plain vLLM without LoRA: {plain['tokens_per_s']:.1f} tok/s, measured once, before the others. One "
          "`vllm-t2l serve` server per row (its --max-lora-rank and --lora-target-modules).", "",
          *report.table(["targets", "rank", "base tok/s", "base x plain", "adapters tok/s", "adapters x plain",
                         "adapters x base", "errors"],
                        [[r["targets"], r["rank"], r["base_tokens_per_s"], f"{r['base_x_plain']:.2f}",
                          r["static_tokens_per_s"], f"{r['adapters_x_plain']:.2f}", f"{r['adapters_x_base']:.2f}",
                          r["base_errors"] + r["static_errors"]] for r in rows])]
    path = report.write(args.out, "lora_cost", "\n".join(md), {"context": ctx, "plain": plain, "rows": rows})
    plot(rows, args.out / "lora_cost.png")
    print(path.read_text())


def plot(rows: list[dict], path: Path) -> None:
    """Throughput over plain vLLM's against rank, one line per targets, adapters and base."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for t in dict.fromkeys(r["targets"] for r in rows):
        mine = [r for r in rows if r["targets"] == t]
        line, = ax.plot([r["rank"] for r in mine], [r["adapters_x_plain"] for r in mine], marker="o",
                        label=f"{mine[0]['k']} adapters, {t}")
        ax.plot([r["rank"] for r in mine], [r["base_x_plain"] for r in mine], marker="x", linestyle="--",
                color=line.get_color(), label=f"base model in that server, {t}")
    ranks = sorted({r["rank"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(xlabel="LoRA rank (--max-lora-rank)", ylabel="throughput / plain vLLM's",
           ylim=(0, max(1.1, *(r["base_x_plain"] for r in rows if math.isfinite(r["base_x_plain"])))))
    ax.legend(fontsize=8)
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
