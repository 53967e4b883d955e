"""Hypernetwork throughput per architecture, and embed + forward latency of the shipped checkpoints.

    python -m benchmarks.hypernet_speed [--device cpu] [--repeats 30] [--batches 1,4,16,64] [--out DIR]

Shapes: the embedded SmolLM2-135M (30 layers, q_proj 576->576, v_proj 576->192, rank 8) and
Mistral-7B (32 layers, q_proj 4096->4096, v_proj 4096->1024). Writes hypernet_speed.{md,json,png} under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks import report
from vllm_t2l.hypernet import ARCHS, BaseShapes, FoldedCodes, HyperConfig, HyperNet
from vllm_t2l.serving.resolver import Settings

SHAPES = {
    "SmolLM2-135M": BaseShapes("SmolLM2-135M", 30, {"q_proj": (576, 576), "v_proj": (576, 192)}),
    "Mistral-7B": BaseShapes("Mistral-7B", 32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)}),
}
SERVED_THREADS = Settings.cpu_threads  # what the resolver uses on CPU


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


@torch.no_grad()
def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    threads = torch.get_num_threads()
    lines = ["# Hypernetwork speed", "", f"device: {args.device}, torch threads: {threads}", "",
             "## Embed + forward, one new description per call, shipped checkpoints", "",
             f"On CPU the server runs these with {SERVED_THREADS} thread (`VLLM_T2L_CPU_THREADS`): vLLM's CPU worker "
             "keeps the other cores.", "",
             "| checkpoint | embedder | strength | descriptions | threads | p50 ms | p95 ms |",
             "|---|---|---|---|---|---|---|"]

    from benchmarks.server import descriptions
    from vllm_t2l.generator import Generator
    from vllm_t2l.models import MINILM_CHECKPOINT, STATIC_CHECKPOINT
    from vllm_t2l.names import spec_from_parts

    texts = {"short": [f"Answer like a patient tutor, variant {i}." for i in range(args.repeats + 1)],
             "cold-miss set": descriptions(args.repeats + 1)}
    embed_forward = {}
    for folder in (MINILM_CHECKPOINT, STATIC_CHECKPOINT):
        gen = Generator.load(folder, device=args.device)
        # at a strength above 1 a checkpoint with a follow network runs that network too
        for strength in sorted({1.0, gen.checkpoint.recommended_strength}):
            for kind, descs in texts.items():
                tokens = statistics.median(gen.embedder.model.preprocess([d])["input_ids"].numel() for d in descs)
                for n in sorted({SERVED_THREADS, threads}) if args.device == "cpu" else [threads]:
                    torch.set_num_threads(n)
                    it = iter(spec_from_parts([d], strength=strength) for d in descs)
                    ms = timed(lambda g=gen, i=it: g.generate([next(i)]), args.repeats)
                    label = f"{kind}, median {tokens:.0f} tokens"
                    at = "" if strength == 1 else f", strength {strength:g}"
                    one = embed_forward[f"{folder.name}{at}, {label}, {n} thread{'s' * (n > 1)}"] = {
                        "p50": statistics.median(ms), "n": len(ms), "p95": sorted(ms)[int(0.95 * len(ms)) - 1],
                        "descriptions": kind, "threads": n, "strength": strength}
                    lines.append(f"| {folder.name} | {gen.checkpoint.embedder.name} | {strength:g} | {label} | {n} | "
                                 f"{one['p50']:.1f} | {one['p95']:.1f} |")
    torch.set_num_threads(threads)
    lines.append("")
    rows = []

    lines += ["## Forward pass only (latent 128, head_in 512, rank 8)", "",
              "| shapes | arch | params | " + " | ".join(f"batch {b}: ms / adapters/s" for b in batches) + " |",
              "|---|---|---|" + "---|" * len(batches)]
    for shape_name, shapes in SHAPES.items():
        for arch in ARCHS:
            net = HyperNet(HyperConfig(arch=arch, emb_dim=384, latent=128, head_in=512), shapes).to(args.device).eval()
            params = sum(p.numel() for p in net.parameters())
            # Zhyper's served path stops at the codes (vLLM expands them), computed by FoldedCodes.
            variants = {arch: net, **({f"{arch}: codes, folded (served)": FoldedCodes(net)}
                                      if arch.startswith("zhyper") else {})}
            for name, fn in variants.items():
                cells = []
                for b in batches:
                    emb = torch.randn(b, 384, device=args.device)
                    ms = statistics.median(timed(lambda f=fn, e=emb: (f(e), sync()), max(3, args.repeats // 3)))
                    cells.append(f"{ms:.1f} / {b / ms * 1000:.0f}")
                    rows.append({"shapes": shape_name, "arch": name, "params": params, "batch": b, "ms": ms,
                                 "adapters_per_s": b / ms * 1000})
                lines.append(f"| {shape_name} | {name} | {params / 1e6:.2f}M | " + " | ".join(cells) + " |")
    ctx = report.context("benchmarks.hypernet_speed")
    out = report.write(args.out, "hypernet_speed", "\n".join(lines),
                       {"context": ctx, "device": args.device, "threads": torch.get_num_threads(),
                        "embed_forward_ms": embed_forward, "forward": rows})
    plot(rows, args.out / "hypernet_speed.png")
    print(out.read_text())


def plot(rows: list[dict], path: Path) -> None:
    """Adapters per second against batch size, one panel per base model's shapes."""
    plt = report.pyplot()
    shapes = list(dict.fromkeys(r["shapes"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for arch in dict.fromkeys(r["arch"] for r in rows):
            mine = [r for r in rows if r["shapes"] == shape and r["arch"] == arch]
            ax.plot([r["batch"] for r in mine], [r["adapters_per_s"] for r in mine], marker="o", label=arch)
        ax.set(xscale="log", yscale="log", xlabel="batch (descriptions per forward pass)", ylabel="adapters/s",
               title=f"hypernetwork forward, {shape} shapes")
        ax.legend(fontsize=8)
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
