"""What do a checkpoint's adapters do with a few wordings? Greedy answers through Hugging Face transformers, no
vLLM server, so it runs in a minute beside a training run.

    .venv/bin/python -m benchmarks.diagnostics.adapter_probe runs/zdial3/checkpoint "Be terse." "Be verbose."
    .venv/bin/python -m benchmarks.diagnostics.adapter_probe CKPT "Talk like a pirate." --strengths 1,2,3 \\
        --system-prompt

Answers the first ``--queries`` held-out queries (greedy, at most ``--max-tokens``) with each wording's
generated adapter and prints the mean of every measure of ``vllm_t2l/train/checks.py``, how many answers open
with a dial rule's phrase (benchmarks/diagnostics/openers.py), the adapter's size (Frobenius norm of its whole
update) and the first answer's start and end (where a sign-off or a closing question would be), then how near
each wording's embedding lies to each dial pole's training wordings (mean cosine): a dial can only reach a
wording its embedder puts near the right pole.
A diagnostic, not a benchmark: the control curves (benchmarks/control.py) are the measurement.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.control import spread
from benchmarks.diagnostics.openers import opener_counts
from benchmarks.diagnostics.pole_match import pole_closeness
from vllm_t2l.generator import Generator
from vllm_t2l.models import prepare_default_model
from vllm_t2l.names import spec_from_parts
from vllm_t2l.train import data
from vllm_t2l.train.checks import MEASURES
from vllm_t2l.train.evaluate import as_batch
from vllm_t2l.train.student import Student

SHOWN = ("words", "sentiment", "formality", "pirate")


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("wordings", nargs="+")
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--strengths", default="1", help="comma-separated strengths of each wording's adapter")
    parser.add_argument("--system-prompt", action="store_true",
                        help="also answer with each wording as the system prompt and no adapter, and with neither")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    strengths = [float(s) for s in args.strengths.split(",")]

    gen = Generator.load(args.checkpoint)
    student = Student(prepare_default_model(), gen.checkpoint.config.target_modules)
    queries = spread([q["text"] for q in data.load_queries() if q["split"] != "train"], args.queries)
    prompts = [student.prompt_ids(q) for q in queries]
    print("| wording | " + " | ".join(SHOWN) + " | openers | ‖dW‖ | first answer | its end |\n|---|"
          + "---|" * (len(SHOWN) + 4))
    def row(label: str, answers: list[str], norm: str) -> None:
        means = [sum(map(MEASURES[m], answers)) / len(answers) for m in SHOWN]
        first = answers[0].replace("\n", " ").replace("|", "/")
        opened = sum(opener_counts([a.strip() for a in answers]).values())  # the styles' phrases do not overlap
        cells = [f"{v:.2f}" for v in means] + [f"{opened}/{len(answers)}", norm, first[:120], first[-60:]]
        print(f"| {label} | " + " | ".join(cells) + " |")

    def answer(prompt_ids: list[list[int]]) -> list[str]:
        return [student.tokenizer.decode(ids, skip_special_tokens=True)
                for ids in student.generate(prompt_ids, args.max_tokens)]

    if args.system_prompt:
        row("(base model)", answer(prompts), "0")
    for wording in args.wordings:
        if args.system_prompt:
            student.set_adapters(None)
            row(f"{wording} (system prompt)", answer([student.prompt_ids(q, system=wording) for q in queries]), "0")
        for strength in strengths:
            with torch.no_grad():
                adapter = gen.generate_one(spec_from_parts([wording], strength=strength))
                student.set_adapters(*as_batch([adapter] * len(queries)))
                answers = answer(prompts)
            label = wording if strength == 1 else f"{wording} (strength {strength:g})"
            row(label, answers, f"{adapter.norm():.2f}")
        student.set_adapters(None)

    names, closeness = pole_closeness(gen.embedder, args.wordings)
    print("\n| wording | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for wording, cosines in zip(args.wordings, closeness.tolist()):
        print(f"| {wording} | " + " | ".join(f"{c:.2f}" for c in cosines) + " |")


if __name__ == "__main__":
    main()
