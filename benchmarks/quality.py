"""Held-out quality of the shipped checkpoint against its baselines, in one run.

    python -m benchmarks.quality [--checkpoint DIR] [--compare DIR,...] [--multitask-steps N] [--oracles K]
                                 [--oracle-steps N]

Trains (or reuses, under runs/) the description-blind multi-task LoRA and K per-prompt oracle LoRAs
for held-out checkable prompts, then runs `vllm-t2l eval` on all of them. Writes
benchmarks/results/quality.{md,json,png}.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from vllm_t2l.models import DEFAULT_CHECKPOINT
from vllm_t2l.train import data
from vllm_t2l.train.evaluate import EvalConfig, evaluate
from vllm_t2l.train.loop import TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--teacher-cache", default="runs/zhyper-diag/teacher-train.pt",
                        help="reuse the hypernetwork's training answers for the multi-task LoRA")
    parser.add_argument("--multitask-steps", type=int, default=100)
    parser.add_argument("--oracles", type=int, default=4)
    parser.add_argument("--oracle-steps", type=int, default=40)
    parser.add_argument("--compare", default="", help="more checkpoints (comma-separated) reported beside it")
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    runs = Path("runs")
    multitask = runs / "multitask"
    multitask.mkdir(parents=True, exist_ok=True)
    if Path(args.teacher_cache).exists() and not (multitask / "teacher-train.pt").exists():
        shutil.copy(args.teacher_cache, multitask / "teacher-train.pt")
    mt = train(TrainConfig(arch="lora", out=str(multitask), steps=args.multitask_steps, per_prompt=10))

    held = [p for p in data.load_prompts() if p["split"] != "train" and p.get("check")]
    oracle_root = runs / "oracles"
    for p in held[:: max(1, len(held) // args.oracles)][: args.oracles]:
        folder = train(TrainConfig(arch="lora", out=str(runs / "oracle-runs" / p["id"]), steps=args.oracle_steps,
                                   prompt_ids=(p["id"],), per_prompt=24, save_every=args.oracle_steps))
        target = oracle_root / p["id"]
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)

    cfg = EvalConfig(checkpoint=args.checkpoint, out=args.out + "/quality", multitask=str(mt),
                     oracles=str(oracle_root), work="runs/eval",
                     compare=tuple(c for c in args.compare.split(",") if c))
    evaluate(cfg)
    print((Path(cfg.out) / "quality.md").read_text())


if __name__ == "__main__":
    main()
