"""The follow benchmark's question in about a minute: does each held-out description's adapter move its attribute
the asked way? Greedy answers through Hugging Face transformers instead of the server, at one strength, against
the base model's answers; no system prompt, teacher or perplexity. For screening follow networks: at strength 2
the default's answers and attribute means equal the served benchmark's (2026-12-08), but
`python -m benchmarks.follow` stays the measurement.

    .venv/bin/python -m benchmarks.diagnostics.follow_quick vllm_t2l/checkpoints/smollm2-135m-static
    .venv/bin/python -m benchmarks.diagnostics.follow_quick CKPT --follow-idf 0.5

`--follow-idf A` feeds the follow network (strengths above 1) the description with description-idf ** A token
weights (benchmarks/diagnostics/idf.py) while the first network reads the checkpoint's own embedding.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.control import spread
from benchmarks.diagnostics.idf import idf_embedder
from benchmarks.follow import MEASURES, load_descriptions, repetition
from vllm_t2l.generator import Generator
from vllm_t2l.lora import LoRAWeights, from_batch
from vllm_t2l.models import prepare_default_model
from vllm_t2l.names import AdapterNameError, check_strength, spec_from_parts
from vllm_t2l.train import data
from vllm_t2l.train.evaluate import as_batch
from vllm_t2l.train.student import Student


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--strength", type=float, help="the adapters' strength (default: the checkpoint's "
                        "recommended one)")
    parser.add_argument("--queries", type=int, default=3, help="held-out queries, as the benchmark spreads them")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--descriptions", type=int, default=0, help="use the first N descriptions (0: all)")
    parser.add_argument("--follow-idf", type=float, metavar="A",
                        help="the follow network reads the description with description-idf ** A token weights")
    parser.add_argument("--answers", type=Path, metavar="JSON", help="also write every answer here")
    return parser


@torch.no_grad()
def adapters(gen: Generator, descriptions: list[str], strength: float,
             follow_embed: Callable[[list[str]], torch.Tensor] | None = None) -> list[LoRAWeights]:
    """Each description's adapter at ``strength``; with ``follow_embed`` the follow network reads its embedding."""
    if follow_embed is None:
        return gen.generate([spec_from_parts([d], strength=strength) for d in descriptions])
    net, c = gen.checkpoint.hypernet, gen.checkpoint.config
    first = net.first_network().codes(gen.embedder(descriptions))
    follow = net.follow.codes(follow_embed(descriptions))
    batch = net.from_codes(net.at_strength({m: torch.cat([z, follow[m]], -1) for m, z in first.items()}, strength))
    return [from_batch(batch, i, c.alpha_for(c.served_rank), c.use_rslora) for i in range(len(descriptions))]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    gen = Generator.load(args.checkpoint)
    strength = gen.checkpoint.recommended_strength if args.strength is None else args.strength
    try:
        check_strength(strength)
    except AdapterNameError as e:
        raise SystemExit(f"--strength: {e}") from None
    follow_embed = None
    if args.follow_idf is not None:
        if strength == 1 or gen.checkpoint.hypernet.follow is None:
            raise SystemExit("--follow-idf needs a checkpoint with a follow network and a strength other than 1")
        follow_embed = idf_embedder(gen.embedder, args.follow_idf)
    descs = load_descriptions()[: args.descriptions or None]
    queries = spread([q["text"] for q in data.load_queries() if q["split"] != "train"], args.queries)
    student = Student(prepare_default_model(), gen.checkpoint.config.target_modules)
    prompts = [student.prompt_ids(q) for q in queries]

    def answer(ids: list[list[int]]) -> list[str]:
        return [student.tokenizer.decode(x, skip_special_tokens=True) for x in student.generate(ids, args.max_tokens)]

    base = answer(prompts)
    made = adapters(gen, [d["description"] for d in descs], strength, follow_embed)
    jobs = [(i, q) for i in range(len(descs)) for q in range(len(queries))]
    got: dict[int, list[str]] = {}
    for start in range(0, len(jobs), 32):
        chunk = jobs[start:start + 32]
        student.set_adapters(*as_batch([made[i] for i, _ in chunk]))
        for (i, _), text in zip(chunk, answer([prompts[q] for _, q in chunk])):
            got.setdefault(i, []).append(text)
    student.set_adapters(None)
    if args.answers:
        args.answers.write_text(json.dumps({"base": base} | {d["description"]: got[i] for i, d in enumerate(descs)}))

    moved: dict[str, list[bool]] = {}
    for i, d in enumerate(descs):
        fn, param = MEASURES[d["measure"]], d.get("param")
        before, after = (statistics.fmean(fn(t, param) for t in texts) for texts in (base, got[i]))
        ok = d["direction"] * (after - before) > 0
        moved.setdefault(d["behaviour"], []).append(ok)
        if not ok:
            print(f"not moved: {d['description']} ({d['measure']} {before:.2f} -> {after:.2f})")
    n = sum(map(sum, moved.values()))
    reps = statistics.median(statistics.fmean(map(repetition, texts)) for texts in got.values())
    print(f"{args.checkpoint} at strength {strength:g}" + (f", follow network on idf ** {args.follow_idf:g}"
          if follow_embed else "") + f": moved {n} of {len(descs)} ({n / len(descs):.0%}), median repetition "
          f"{reps:.3f}")
    print("per behaviour: " + ", ".join(f"{b} {sum(v)}/{len(v)}" for b, v in moved.items()))


if __name__ == "__main__":
    main()
