"""Which rule-made opening phrases (vllm_t2l/train/dials.py) do a control run's answers start with?

    python -m benchmarks.diagnostics.openers runs/control-zdial3 [--pair sentiment] [--mode weight]

A dial-trained adapter can move a lexicon score by changing the mix of openers it writes rather than by taking
one tone, and the mean attribute cannot tell the two apart. This counts, at w = 0, 0.5 and 1, the answers of
one sweep (from ``<work>/answers.json`` and ``<work>/results/control.json`` of benchmarks/control.py) that
open with each style's phrases.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_t2l.train.dials import OPENERS


def opener_counts(answers: list[str]) -> dict[str, int]:
    return {style: sum(any(a.startswith(o.strip()) for o in phrases) for a in answers)
            for style, phrases in OPENERS.items()}


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="the --work folder of a benchmarks.control run")
    parser.add_argument("--pair", default="sentiment")
    parser.add_argument("--mode", default="weight", choices=["weight", "emb"])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    points = json.loads((args.work / "results" / "control.json").read_text())["points"]
    answers = json.loads((args.work / "answers.json").read_text())
    print("| w | answers | " + " | ".join(OPENERS) + " |\n|---|---|" + "---|" * len(OPENERS))
    for i, p in enumerate(points):
        if p["pair"] == args.pair and p["mode"] == args.mode and p["w"] in (0, 0.5, 1):
            mine = [a["answer"] for a in answers if a["key"] == ["point", i]]
            print(f"| {p['w']} | {len(mine)} | " + " | ".join(map(str, opener_counts(mine).values())) + " |")


if __name__ == "__main__":
    main()
