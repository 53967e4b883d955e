"""Can codes carry a sign-off word the hypernetwork never saw? A copy path tried beside a frozen checkpoint.

    .venv/bin/python -m benchmarks.diagnostics.copy_probe vllm_t2l/checkpoints/smollm2-135m-static

Each sign-off wording's codes become its served codes at ``--strength`` plus ``W e(word) + b``, where ``e(word)``
is the base model's own input embedding of the word's tokens (their mean) and ``W``, ``b`` are shared by every
word. Only ``W`` and ``b`` are trained, on the sign-off dial pole's wordings and words (rule-made targets on
training queries); then the follow benchmark's sign-off descriptions, whose words no training row has, are scored
on held-out queries. The word is given (an oracle): this tests carrying a word into the codes, not finding it in
the description. ``fit_probe`` shows one word's codes exist in the basis; this asks whether one map reaches them
for words it was not fitted on.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from benchmarks.control import spread
from benchmarks.diagnostics.fit_probe import add_fit_options, answers, install, lora_of, rule_targets, ruled_loss
from benchmarks.follow import MEASURES, load_descriptions
from vllm_t2l.generator import Generator
from vllm_t2l.models import prepare_default_model
from vllm_t2l.names import spec_from_parts
from vllm_t2l.train import data
from vllm_t2l.train.student import Student


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--lr", type=float, default=0.003)
    add_fit_options(parser, steps=200)
    parser.add_argument("--extra-words", type=int, default=0, metavar="N",
                        help="also train on N words from the base model's vocabulary, each in one of the pole's "
                        "wordings")
    return parser


def vocabulary_rows(tokenizer, rows: list[tuple[str, str]], held_out: set[str], n: int,
                    rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (wording, word) rows: capitalised whole words of the tokenizer's vocabulary (one token with a leading
    space, at least four letters), none a held-out or pole word, each put into one of the pole's wordings."""
    frames = sorted({d.replace(w, "{}") for d, w in rows})
    taken = held_out | {w.lower() for _, w in rows}
    words = sorted({t[1:].capitalize() for t in tokenizer.get_vocab() if t.startswith("\u0120") and t[1:].isalpha()
                    and t[1:].isascii() and len(t) > 4 and t[1:].lower() not in taken})
    return [(rng.choice(frames).format(w), w) for w in rng.sample(words, min(n, len(words)))]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = Generator.load(args.checkpoint)
    c = gen.checkpoint.config
    if not gen.zhyper:
        raise SystemExit(f"{args.checkpoint}: the probe adds to Zhyper codes; this checkpoint is {c.arch}")
    strength = gen.checkpoint.recommended_strength if args.strength is None else args.strength
    student = Student(prepare_default_model(), c.target_modules)
    pole = next(p for p in data.load_dials() if p["style"] == "signoff")
    train_rows = list(zip(pole["descriptions"], pole["params"]))
    test_rows = [(d["description"], d["param"]) for d in load_descriptions() if d["measure"] == "ends_with"]
    train_rows += vocabulary_rows(student.tokenizer, train_rows, {w.lower() for _, w in test_rows},
                                  args.extra_words, rng)
    seen_words = {w.lower() for _, w in train_rows}
    if any(w.lower() in seen_words for _, w in test_rows):
        raise SystemExit("a held-out sign-off word is also a training word")

    with torch.no_grad():
        texts = [d for d, _ in train_rows + test_rows]
        served = gen.codes([spec_from_parts([d], strength=strength) for d in texts])
        z0 = {m: torch.cat([z[m] for z in served]) for m in served[0]}  # [N, L, R]
        table = student.model.get_input_embeddings().weight
        words = [w for _, w in train_rows + test_rows]
        e = torch.stack([table[student.tokenizer(w, add_special_tokens=False)["input_ids"]].mean(0) for w in words])
    shapes = {m: z.shape[1:] for m, z in z0.items()}
    head = torch.nn.Linear(e.shape[1], sum(s.numel() for s in shapes.values()))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    basis = gen.checkpoint.hypernet.basis()

    def codes(rows: list[int], copy: bool = True) -> dict[str, torch.Tensor]:
        extra = head(e[rows]) if copy else torch.zeros(len(rows), head.out_features)
        parts = extra.split([s.numel() for s in shapes.values()], -1)
        return {m: z0[m][rows] + p.view(len(rows), *shapes[m]) for (m, p) in zip(shapes, parts)}

    queries = data.load_queries()
    train_q = [q["text"] for q in queries if q["split"] == "train"][: args.train_queries]
    held = spread([q["text"] for q in queries if q["split"] != "train"], args.queries)
    prompts = [student.prompt_ids(q) for q in train_q]
    base = student.generate(prompts, args.answer_tokens)

    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        rows = rng.sample(range(len(train_rows)), args.batch_size)
        qs = [rng.randrange(len(train_q)) for _ in rows]
        responses, ruled = rule_targets(student, [base[q] for q in qs], "signoff", [words[r] for r in rows], rng)
        install(student, lora_of(basis, codes(rows)), len(rows), c.scaling)
        loss, on_rule = ruled_loss(student, [prompts[q] for q in qs], responses, ruled, args.ruled_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step}: loss {loss.item():.4f}, on the rule's tokens {on_rule.item():.4f}", flush=True)

    ends_with = MEASURES["ends_with"]

    @torch.no_grad()
    def score(row: int, copy: bool) -> tuple[float, str]:
        install(student, lora_of(basis, codes([row], copy)), len(held), c.scaling)
        out = answers(student, held, args.max_tokens)
        return statistics.fmean(ends_with(t, words[row]) for t in out), out[0][-60:]

    n_train = len(train_rows)
    shown = list(range(0, n_train, n_train // 4))[:4]  # four training words, then every held-out description
    for row in shown + list(range(n_train, n_train + len(test_rows))):
        kind = "training word" if row < n_train else "held-out word"
        with_copy, tail = score(row, True)
        without, _ = score(row, False)
        print(f"{kind} {words[row]!r} ({texts[row]}): ends with it {with_copy:.2f} with the copy path, "
              f"{without:.2f} served; {tail!r}")
    install(student, None, 1, c.scaling)


if __name__ == "__main__":
    main()
