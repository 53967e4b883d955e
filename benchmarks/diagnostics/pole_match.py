"""Which dial pole does each held-out follow description embed nearest? Separates the embedder's part of a
follow failure from the hypernetwork's: a network trained on the poles' wordings can only carry a description
its embedder puts near the right pole.

    .venv/bin/python -m benchmarks.diagnostics.pole_match vllm_t2l/checkpoints/smollm2-135m-static \\
        vllm_t2l/checkpoints/smollm2-135m-minilm

For each checkpoint's embedder: how many of `benchmarks/data/follow.jsonl`'s descriptions lie nearest (mean cosine
to the pole's training wordings) to the pole of their own behaviour, and where the others land. Seconds; no base model.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.follow import load_descriptions
from vllm_t2l.generator import Generator
from vllm_t2l.train import data

POLE = {"brevity": "short", "verbosity": "long", "capitals": "caps", "bullets": "bullets", "sign-off": "signoff",
        "line count": "lines", "pirate": "pirate", "formal": "formal", "casual": "casual", "positive": "cheerful",
        "negative": "gloomy", "exclamations": "exclaim", "chef": "chef", "sports": "sports", "question": "question"}


def pole_closeness(embed: Callable[[list[str]], torch.Tensor], texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """The dial poles' styles, and each text's mean cosine to each pole's training wordings [texts, poles]."""
    poles = {p["style"]: F.normalize(embed(p["descriptions"]), dim=-1) for p in data.load_dials()}
    e = F.normalize(embed(texts), dim=-1)
    return list(poles), torch.stack([(e @ wordings.T).mean(dim=1) for wordings in poles.values()], dim=1)


def nearest_poles(embed: Callable[[list[str]], torch.Tensor], descriptions: list[str]) -> list[str]:
    """The style of the dial pole each description lies nearest."""
    names, closeness = pole_closeness(embed, descriptions)
    return [names[i] for i in closeness.argmax(dim=1).tolist()]


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    rows = load_descriptions()
    for checkpoint in args.checkpoints:
        with torch.no_grad():
            got = nearest_poles(Generator.load(checkpoint).embedder, [r["description"] for r in rows])
        misses = [f'{r["behaviour"]} -> {g}' for r, g in zip(rows, got) if g != POLE[r["behaviour"]]]
        print(f"{checkpoint}: {len(rows) - len(misses)} of {len(rows)} nearest their own pole"
              + (f"; the others: {', '.join(misses)}" if misses else ""))


if __name__ == "__main__":
    main()
