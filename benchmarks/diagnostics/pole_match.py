"""Which dial pole does each held-out follow description embed nearest? Separates the embedder's part of a
follow failure from the hypernetwork's: a network trained on the poles' wordings can only carry a description
its embedder puts near the right pole.

    .venv/bin/python -m benchmarks.diagnostics.pole_match vllm_t2l/checkpoints/smollm2-135m-static \\
        vllm_t2l/checkpoints/smollm2-135m-minilm --minilm-layers 1 2 3

For each checkpoint's embedder: how many of `benchmarks/data/follow.jsonl`'s descriptions lie nearest (mean cosine
to the pole's training wordings) to the pole of their own behaviour, where the others land, and the median time to
embed one description on one thread. `--minilm-layers K` asks the same of the packaged MiniLM cut to its first K
transformer layers (an embedder no checkpoint uses yet): how much context a cheap embedder needs. `--idf A ...` asks
it of each static-embedder checkpoint's embedder with description-idf ** A token weights (diagnostics/idf.py).
`--wordings W ...` adds each wording's three nearest poles. Seconds; no base model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.diagnostics.idf import idf_embedder
from benchmarks.follow import load_descriptions
from vllm_t2l.embed import Embedder
from vllm_t2l.generator import Generator
from vllm_t2l.models import default_embedder_path
from vllm_t2l.train import data

POLE = {"brevity": "short", "verbosity": "long", "capitals": "caps", "bullets": "bullets", "sign-off": "signoff",
        "line count": "lines", "pirate": "pirate", "formal": "formal", "casual": "casual", "positive": "cheerful",
        "negative": "gloomy", "exclamations": "exclaim", "chef": "chef", "sports": "sports", "question": "question"}


def pole_closeness(embed: Callable[[list[str]], torch.Tensor], texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """The dial poles' styles, and each text's mean cosine to each pole's training wordings [texts, poles]."""
    poles = {p["style"]: F.normalize(embed(p["descriptions"]), dim=-1) for p in data.load_dials()}
    e = F.normalize(embed(texts), dim=-1)
    return list(poles), torch.stack([(e @ wordings.T).mean(dim=1) for wordings in poles.values()], dim=1)


def minilm_cut(layers: int, folder: str) -> Embedder:
    """The packaged MiniLM with only its first ``layers`` transformer layers, saved to ``folder`` and loaded back
    as a checkpoint's sentence-transformers embedder is, so that its timing is the served path's."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(default_embedder_path()), device="cpu", local_files_only=True)
    bert = model[0].auto_model
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    model.save(folder)
    return Embedder.describe(folder, f"all-MiniLM-L6-v2, first {layers} layers")


def median_ms(embed: Callable[[list[str]], torch.Tensor], texts: list[str]) -> float:
    """Median milliseconds to embed one text alone, as a cold miss does, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed(texts[:1])
        times = []
        for text in texts:
            start = time.perf_counter()
            embed([text])
            times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--minilm-layers", type=int, nargs="*", default=[], metavar="K",
                        help="also the packaged MiniLM cut to its first K transformer layers (1 to 6)")
    parser.add_argument("--idf", type=float, nargs="*", default=[], metavar="A",
                        help="also each checkpoint's static embedder with description-idf ** A token weights")
    parser.add_argument("--wordings", nargs="*", default=[], metavar="W",
                        help="also print these wordings' three nearest poles")
    return parser


def report(name: str, embed: Callable[[list[str]], torch.Tensor], rows: list[dict], wordings: list[str]) -> None:
    descriptions = [r["description"] for r in rows]
    with torch.no_grad():
        names, closeness = pole_closeness(embed, descriptions + wordings)
        ms = median_ms(embed, descriptions)
    got = [names[i] for i in closeness[:len(rows)].argmax(dim=1).tolist()]
    misses = [f'{r["behaviour"]} -> {g}' for r, g in zip(rows, got) if g != POLE[r["behaviour"]]]
    print(f"{name}: {len(rows) - len(misses)} of {len(rows)} nearest their own pole, {ms:.2f} ms per description"
          + (f"; the others: {', '.join(misses)}" if misses else ""))
    for wording, row in zip(wordings, closeness[len(rows):]):
        top = row.topk(3)
        nearest = zip(top.values.tolist(), top.indices.tolist())
        print(f"  {wording!r}: " + ", ".join(f"{names[i]} {v:.2f}" for v, i in nearest))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.checkpoints and not args.minilm_layers:
        raise SystemExit("name a checkpoint, or --minilm-layers K, whose embedder to ask")
    if bad := [k for k in args.minilm_layers if not 1 <= k <= 6]:
        raise SystemExit(f"--minilm-layers: MiniLM has layers 1 to 6, not {bad[0]}")
    rows = load_descriptions()
    for checkpoint in args.checkpoints:
        embedder = Generator.load(checkpoint).embedder
        report(checkpoint, embedder, rows, args.wordings)
        for alpha in args.idf:
            report(f"{checkpoint}, description-idf ** {alpha:g}", idf_embedder(embedder, alpha), rows, args.wordings)
    for layers in args.minilm_layers:
        with tempfile.TemporaryDirectory() as folder:
            report(f"MiniLM, first {layers} of 6 layers", minilm_cut(layers, folder), rows, args.wordings)


if __name__ == "__main__":
    main()
