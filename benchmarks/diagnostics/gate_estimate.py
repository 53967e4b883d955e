"""Would a gate keep dial training off the held-out descriptions? An exact estimate from two checkpoints, no new
training:

    .venv/bin/python -m benchmarks.diagnostics.gate_estimate runs/zcm/checkpoint runs/zdial8/checkpoint \\
        --work runs/eval-zdial9

The gate sends a description to the dial checkpoint when its nearest dial-pole training wording (cosine, by the
dial checkpoint's embedder) is at least tau, and to the quality checkpoint otherwise. Each held-out sample's KL is
then exactly one of the two checkpoints' KLs, so the table is the held-out gap such a pair would close, per tau.
The control wordings' lowest nearest-pole cosine is printed too: a tau at or below it leaves the control curves
exactly the dial checkpoint's; so is how near each pole wording lies to the others, which says what share of new
wordings of a pole a given tau would catch. A diagnostic for a design, not a benchmark.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.control import PAIRS
from vllm_t2l.generator import Generator
from vllm_t2l.models import prepare_default_model
from vllm_t2l.train import data, teacher
from vllm_t2l.train.evaluate import EvalConfig, generated_adapters, kl_per_sample
from vllm_t2l.train.student import Student

TAUS = (0.0, 0.6, 0.62, 0.64, 0.65, 0.7, 0.73, 0.75, 1.01)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("quality", help="checkpoint for descriptions far from every pole")
    parser.add_argument("dial", help="checkpoint for descriptions near a pole")
    parser.add_argument("--work", required=True, help="a `vllm-t2l eval --work` folder holding teacher-heldout.pt")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    samples = teacher.load(Path(args.work) / "teacher-heldout.pt")
    gens = {path: Generator.load(path) for path in (args.quality, args.dial)}
    student = Student(prepare_default_model(), gens[args.quality].checkpoint.config.target_modules)
    cfg = EvalConfig(checkpoint=args.quality)
    kl = {"base": torch.tensor(kl_per_sample(student, samples, lambda s: None, cfg, "base"))}
    for path, gen in gens.items():
        lora = generated_adapters(gen, samples)
        kl[path] = torch.tensor(kl_per_sample(student, samples, lambda s, lora=lora: lora[s.description], cfg,
                                              path))

    embedder = gens[args.dial].embedder
    poles = F.normalize(embedder([w for p in data.load_dials() for w in p["descriptions"]]), dim=-1)

    def nearest(texts: list[str]) -> torch.Tensor:
        return (F.normalize(embedder(texts), dim=-1) @ poles.T).max(1).values

    descriptions = sorted({s.description for s in samples})
    near = dict(zip(descriptions, nearest(descriptions).tolist()))
    cos = torch.tensor([near[s.description] for s in samples])
    family = {p["id"]: p["family"] for p in data.load_prompts()}
    manifesto = torch.tensor([family[s.prompt_id] == "manifesto" for s in samples])
    lowest = nearest([w for p in PAIRS for w in (p.a, p.b)]).min().item()
    others = (poles @ poles.T).fill_diagonal_(-1).max(1).values  # each pole wording as if unseen
    print(f"\n{args.quality} / {args.dial}: control wordings' nearest-pole cosine >= {lowest:.2f}; a pole wording's "
          f"nearest other one: median {others.median():.2f}, 10th percentile {others.quantile(0.1):.2f}\n")
    print("| tau | samples gated to the dial checkpoint | held-out gap closed | manifesto |\n|---|---|---|---|")
    for tau in TAUS:
        gated = torch.where(cos >= tau, kl[args.dial], kl[args.quality])
        closed = 1 - gated.mean() / kl["base"].mean()
        closed_m = 1 - gated[manifesto].mean() / kl["base"][manifesto].mean()
        print(f"| {tau} | {(cos >= tau).float().mean():.1%} | {closed:.1%} | {closed_m:.1%} |")


if __name__ == "__main__":
    main()
