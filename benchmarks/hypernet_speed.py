"""Hypernetwork throughput per architecture, and embed + forward latency of the shipped checkpoint.

    python -m benchmarks.hypernet_speed [--device cpu] [--repeats 30]

Shapes: the embedded SmolLM2-135M (30 layers, q_proj 576->576, v_proj 576->192, rank 8) and
Mistral-7B (32 layers, q_proj 4096->4096, v_proj 4096->1024). Writes benchmarks/results/hypernet_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vllm_t2l.hypernet import ARCHS, BaseShapes, HyperConfig, HyperNet

SHAPES = {
    "SmolLM2-135M": BaseShapes("SmolLM2-135M", 30, {"q_proj": (576, 576), "v_proj": (576, 192)}),
    "Mistral-7B": BaseShapes("Mistral-7B", 32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)}),
}


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", default="1,4,16,64")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    lines = ["# Hypernetwork speed", "", f"device: {args.device}, torch threads: {torch.get_num_threads()}", "",
             "## Embed + forward, one description, shipped checkpoint", ""]

    from vllm_t2l.generator import Generator
    from vllm_t2l.models import DEFAULT_CHECKPOINT
    from vllm_t2l.names import spec_from_parts

    gen = Generator.load(DEFAULT_CHECKPOINT, device=args.device)
    specs = [spec_from_parts([f"Answer like a patient tutor, variant {i}."]) for i in range(args.repeats + 1)]
    it = iter(specs)
    ms = timed(lambda: gen.generate([next(it)]), args.repeats)
    lines += [f"p50 {statistics.median(ms):.1f} ms, p95 {sorted(ms)[int(0.95 * len(ms)) - 1]:.1f} ms "
              f"({gen.checkpoint.config.arch}; new description each call)", ""]

    lines += ["## Forward pass only (latent 128, head_in 512, rank 8)", "",
              "| shapes | arch | params | " + " | ".join(f"batch {b}: ms / adapters/s" for b in batches) + " |",
              "|---|---|---|" + "---|" * len(batches)]
    for shape_name, shapes in SHAPES.items():
        for arch in ARCHS:
            net = HyperNet(HyperConfig(arch=arch, emb_dim=384, latent=128, head_in=512), shapes).to(args.device).eval()
            params = sum(p.numel() for p in net.parameters())
            cells = []
            for b in batches:
                emb = torch.randn(b, 384, device=args.device)
                ms = statistics.median(timed(lambda n=net, e=emb: (n(e), sync()), max(3, args.repeats // 3)))
                cells.append(f"{ms:.1f} / {b / ms * 1000:.0f}")
            lines.append(f"| {shape_name} | {arch} | {params / 1e6:.2f}M | " + " | ".join(cells) + " |")
    out = Path("benchmarks/results/hypernet_speed.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
