"""Can an adapter of the served form show a behaviour at all? Fits one adapter straight to a rule-made target
(``vllm_t2l.train.dials``) and scores it on held-out queries, to tell what a hypernetwork fails to learn from
what no adapter of that form can do.

    .venv/bin/python -m benchmarks.diagnostics.fit_probe vllm_t2l/checkpoints/smollm2-135m-static \\
        "Always finish your answer with the word Bazinga." --style signoff --param Bazinga --fit codes

The fit starts from the description's served adapter at ``--strength``. ``--fit codes`` trains only its codes in
the checkpoint's fixed Zhyper basis (what a better hypernetwork could still reach); ``--fit lora`` trains its A and
B freely at the same rank and target modules (what any adapter vLLM would be handed could reach); ``--fit A`` and
``--fit B`` free one of the two; ``--fit none`` scores the served adapter. The targets are the base model's own
greedy answers to training queries, rewritten by the style's rule; the loss is their cross-entropy, the tokens
the rule wrote weighted up.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.control import spread
from benchmarks.follow import MEASURES
from vllm_t2l.generator import Generator
from vllm_t2l.hypernet import expand_codes
from vllm_t2l.models import prepare_default_model
from vllm_t2l.names import spec_from_parts
from vllm_t2l.train import data, dials
from vllm_t2l.train.student import Student

# The follow benchmark's attribute for each rule-made style.
STYLE_MEASURE = {"signoff": "ends_with", "lines": "line_error", "words": "words", "short": "words", "long": "words",
                 "caps": "upper_share", "bullets": "bullets", "question": "question_end", "exclaim": "exclamations",
                 "formal": "formality", "casual": "formality", "pirate": "pirate", "cheerful": "sentiment",
                 "gloomy": "sentiment", "chef": "food", "sports": "sports"}


FITS = {"codes": "codes fitted in the checkpoint's basis", "lora": "A and B fitted freely",
        "A": "A fitted freely, B the basis's", "B": "B fitted freely, A from the codes", "none": "the served adapter"}


def add_fit_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options a fit to rule-made targets shares with ``copy_probe``."""
    parser.add_argument("--strength", type=float, help="of the served codes (default: the recommended one)")
    parser.add_argument("--train-queries", type=int, default=48)
    parser.add_argument("--queries", type=int, default=8, help="held-out queries scored")
    parser.add_argument("--answer-tokens", type=int, default=64, help="budget of the base answers targets start from")
    parser.add_argument("--max-tokens", type=int, default=80, help="budget of the scored answers")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ruled-weight", type=float, default=8.0, help="loss weight of the tokens the rule wrote "
                        "(and the final EOS), as a dial pole's weight in training")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("description", help="the description whose served adapter the fit starts from")
    parser.add_argument("--style", required=True, choices=sorted(STYLE_MEASURE), help="the rule that writes targets")
    parser.add_argument("--param", help="the style's parameter: the sign-off word, the line count, the word limit")
    parser.add_argument("--fit", choices=FITS, default="codes")
    parser.add_argument("--lr", type=float, help="default: 0.01 for codes, 0.001 for lora")
    parser.add_argument("--save", type=Path, metavar="FILE", help="write the fitted codes, or A and B (safetensors)")
    add_fit_options(parser, steps=150)
    return parser


def rule_targets(student: Student, base_ids: list[list[int]], style: str, params: list, rng: random.Random,
                 ) -> tuple[list[list[int]], list[list[bool]]]:
    """The rule's rewrite of each base answer (token ids, EOS when the rule stops) and which tokens it wrote."""
    tok, eos = student.tokenizer, student.tokenizer.eos_token_id
    responses, ruled = [], []
    for ids, param in zip(base_ids, params):
        base = tok.decode(ids, skip_special_tokens=True).strip()
        text, stop = dials.target(style, base, bool(ids) and ids[-1] == eos, rng, param)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        chars = dials.rule_made(base, text)
        responses.append(enc["input_ids"] + ([eos] if stop else []))
        ruled.append([any(chars[a:b]) for a, b in enc["offset_mapping"]] + ([True] if stop else []))
    return responses, ruled


def ruled_loss(student: Student, prompts: list[list[int]], responses: list[list[int]], ruled: list[list[bool]],
               ruled_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy with the rule's tokens weighted up, the mean cross-entropy of the rule's tokens alone)."""
    batch = student.make_batch(prompts, responses)
    ce = torch.nn.functional.cross_entropy(student.logits(batch), batch.targets, reduction="none")
    mask = torch.tensor([r for row in ruled for r in row])
    weight = torch.where(mask, ruled_weight, 1.0)
    return (ce * weight).sum() / weight.sum(), ce[mask].mean()


def lora_of(basis: dict[str, tuple[torch.Tensor, torch.Tensor]], codes: dict[str, torch.Tensor],
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Codes [N, L, R] -> the student's adapters: A = diag(z) A_shared, B = B_shared."""
    return {m: (expand_codes(z, basis[m][0]), basis[m][1][None, ..., : z.shape[-1]].expand(z.shape[0], -1, -1, -1))
            for m, z in codes.items()}


def install(student: Student, adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, n: int,
            scaling: float) -> None:
    """One adapter ([1, ...]) for ``n`` rows, or one per row ([n, ...]); None removes them."""
    student.set_adapters(None if adapter is None else
                         {m: (A.expand(n, *A.shape[1:]), B.expand(n, *B.shape[1:])) for m, (A, B) in adapter.items()},
                         scaling)


@torch.no_grad()
def answers(student: Student, queries: list[str], max_tokens: int) -> list[str]:
    """Greedy answers with whatever adapters are installed."""
    ids = student.generate([student.prompt_ids(q) for q in queries], max_tokens)
    return [student.tokenizer.decode(x, skip_special_tokens=True) for x in ids]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    param = args.param
    if args.style in dials.PARAM_STYLES and param is None:
        raise SystemExit(f"--style {args.style} needs --param")
    if args.style in ("lines", "words"):
        if not (param.isdigit() and int(param) > 0):
            raise SystemExit(f"--param: --style {args.style} needs a positive whole number, not {param!r}")
        param = int(param)
    gen = Generator.load(args.checkpoint)
    net, c = gen.checkpoint.hypernet, gen.checkpoint.config
    if not gen.zhyper:
        raise SystemExit(f"{args.checkpoint}: the probe fits Zhyper codes; this checkpoint is {c.arch}")
    strength = gen.checkpoint.recommended_strength if args.strength is None else args.strength
    student = Student(prepare_default_model(), c.target_modules)
    queries = data.load_queries()
    train = [q["text"] for q in queries if q["split"] == "train"][: args.train_queries]
    held = spread([q["text"] for q in queries if q["split"] != "train"], args.queries)

    prompts = [student.prompt_ids(q) for q in train]
    responses, ruled = rule_targets(student, student.generate(prompts, args.answer_tokens), args.style,
                                    [param] * len(prompts), rng)

    z0 = gen.codes([spec_from_parts([args.description], strength=strength)])[0]
    basis = net.basis()
    codes = {m: z.clone().requires_grad_(args.fit == "codes") for m, z in z0.items()}
    free_a, free_b = args.fit in ("lora", "A"), args.fit in ("lora", "B")

    with torch.no_grad():
        free = {m: (A.clone().requires_grad_(free_a), B.clone().requires_grad_(free_b))
                for m, (A, B) in lora_of(basis, codes).items()}

    def adapter() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return lora_of(basis, codes) if args.fit == "codes" else free

    params = [t for t in [*codes.values(), *(t for pair in free.values() for t in pair)] if t.requires_grad]
    if params:
        opt = torch.optim.Adam(params, lr=args.lr or (0.01 if args.fit == "codes" else 0.001))
        for step in range(1, args.steps + 1):
            idx = rng.sample(range(len(train)), min(args.batch_size, len(train)))
            install(student, adapter(), len(idx), c.scaling)
            loss, on_rule = ruled_loss(student, [prompts[i] for i in idx], [responses[i] for i in idx],
                                       [ruled[i] for i in idx], args.ruled_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0 or step == 1:
                print(f"step {step}: loss {loss.item():.4f}, on the rule's tokens {on_rule.item():.4f}",
                      flush=True)

    if args.save:
        tensors = ({f"codes.{m}": z[0] for m, z in codes.items()} if args.fit == "codes" else
                   {f"{part}.{m}": t[0] for m, pair in free.items() for part, t in zip("AB", pair)})
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, args.save)
    fn = MEASURES[STYLE_MEASURE[args.style]]

    def scored(texts: list[str], with_adapter: bool) -> tuple[float, list[str]]:
        install(student, adapter() if with_adapter else None, len(texts), c.scaling)
        out = answers(student, texts, args.max_tokens)
        return statistics.fmean(fn(t, param) for t in out), out

    base, _ = scored(held, False)
    fitted, shown = scored(held, True)
    seen, _ = scored(train[: args.queries], True)
    print(f"{args.style} ({STYLE_MEASURE[args.style]}, param {param}) at strength {strength:g}, {FITS[args.fit]}: "
          f"held-out {fitted:.2f} (base model {base:.2f}), training queries {seen:.2f}")
    for q, a in zip(held[:3], shown):
        print(f"  {q} -> {a[-160:]!r}")


if __name__ == "__main__":
    main()
