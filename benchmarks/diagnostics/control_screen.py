"""Which opposite descriptions move their attribute, as a system prompt and as an adapter? The screen
behind control.py's pairs.

    python -m benchmarks.diagnostics.control_screen [--checkpoint DIR] [--queries 12]

A control curve can only move an attribute that its endpoint adapters move, and an adapter can only learn
what the teacher (the base model with the description as its system prompt) does. This answers 12 TRAINING
queries (never the benchmark's held-out ones) with each candidate wording as the system prompt and as the
checkpoint's generated adapter, and reports every measure; control.py's pairs are the wordings whose
adapters moved their attribute most. The wordings are not training descriptions. Writes
benchmarks/results/control/screen.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import report
from benchmarks.control import check_unseen, spread
from vllm_t2l.models import DEFAULT_CHECKPOINT, prepare_default_model
from vllm_t2l.train import data
from vllm_t2l.train.checks import MEASURES

CANDIDATES: dict[str, dict[str, list[str]]] = {
    "words": {"A": ["Please keep your replies as short as you can: a few words at most.",
                    "Answer in one brief sentence and stop.",
                    "Reply with just a few words, nothing more.",
                    "Be extremely brief: give only the bare answer, no explanation.",
                    "Short answers only. One line, no details.",
                    "Reply in under ten words."],
              "B": ["Please give long, detailed replies with background, examples and advice.",
                    "Explain at great length, with many details and several examples.",
                    "Write a long, thorough explanation covering every aspect of the question.",
                    "Give an in-depth, multi-paragraph answer with plenty of examples.",
                    "Be as detailed and comprehensive as you possibly can."]},
    "upper_share": {"A": ["Type your whole answer in small letters, with no capitals anywhere.",
                          "write everything in lowercase, like a lazy text message, no capitals at all.",
                          "reply in all lowercase only."],
                    "B": ["Type your whole answer in capital letters, with no small letters anywhere.",
                          "WRITE EVERYTHING IN CAPITAL LETTERS, LIKE YOU ARE SHOUTING.",
                          "Reply in ALL CAPS only."]},
    "formality": {"A": ["Answer casually, like a laid-back friend: slang, contractions and no fuss.",
                        "Talk like a chill surfer dude texting a buddy: yeah, cool, totally.",
                        "Be super casual and chatty, like texting your best friend, lol.",
                        "Keep it relaxed and informal, dude, like hanging out with pals."],
                  "B": ["Answer formally, in polished and professional language, like an official letter.",
                        "Respond in a formal, courteous and professional manner, as a distinguished butler would.",
                        "Register: formal business English, precise and impersonal.",
                        "Write in a formal academic register with precise, impersonal wording."]},
    "sentiment": {"A": ["Tone: gloomy and pessimistic, expecting the worst from every topic.",
                        "Be miserable and bleak: everything is terrible, sad and hopeless.",
                        "Answer in a sad, despairing tone, as if everything is doomed to fail.",
                        "Sound grumpy and negative: complain about everything.",
                        "You are deeply sad; let your sorrow show in every reply."],
                  "B": ["Tone: cheerful and optimistic, delighted by every topic.",
                        "Be joyful and enthusiastic: everything is wonderful, amazing and exciting!",
                        "Answer with happy, upbeat excitement, celebrating how great everything is.",
                        "Sound cheerful and positive: praise everything you mention.",
                        "You are overjoyed; let your happiness show in every reply."]},
    "pirate": {"A": ["Use plain, modern, neutral English.",
                     "Speak like a precise modern scientist."],
               "B": ["Talk like a pirate: arr, matey, ahoy, ye and aye in every sentence.",
                     "You are a salty old pirate captain. Speak like one.",
                     "Answer as a pirate on the high seas would, with plenty of pirate words.",
                     "Pirate speak only, matey: arr, ye, aye and ahoy."]},
    "sports_vs_food": {"A": ["Explain everything with cooking analogies: recipes, ingredients, ovens and meals.",
                             "Relate every answer to food and cooking in the kitchen.",
                             "Answer like a chef: compare everything to cooking a dish."],
                       "B": ["Explain everything with sports analogies: teams, goals, coaches and matches.",
                             "Relate every answer to sports and athletic games.",
                             "Answer like a coach: compare everything to playing a match."]},
}


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="whose adapters are screened")
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/control")
    parser.add_argument("--work", default="runs/control-screen")
    parser.add_argument("--measures", default="", help="screen only these (comma-separated; default: all)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from transformers import AutoTokenizer

    from vllm_t2l.generator import Generator
    from vllm_t2l.names import spec_from_parts
    from vllm_t2l.serving.offline import answer

    queries = spread([q["text"] for q in data.load_queries() if q["split"] == "train"], args.queries)
    chosen = [m for m in args.measures.split(",") if m] or list(CANDIDATES)
    wordings = [(m, side, d) for m in chosen for side, ds in CANDIDATES[m].items() for d in ds]
    check_unseen([d for *_, d in wordings])
    model_dir = prepare_default_model()
    gen = Generator.load(args.checkpoint)
    specs = [spec_from_parts([d]) for *_, d in wordings]
    folders = [str(lora.save_peft(Path(args.work) / spec.content_id(gen.id), model_dir.name))
               for spec, lora in zip(specs, gen.generate(specs))]
    # every wording twice: as the base model's system prompt, and as its generated adapter; then the base
    setups = [([{"role": "system", "content": d}], None) for *_, d in wordings]
    setups += [([], f) for f in folders] + [([], None)]
    convs = [head + [{"role": "user", "content": q}] for head, _ in setups for q in queries]
    outs = answer(model_dir, convs, args.max_tokens, 1, adapters=[f for _, f in setups for _ in queries])
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]

    def means(setup: int) -> dict[str, float]:
        replies = texts[setup * len(queries):(setup + 1) * len(queries)]
        return {name: sum(fn(t) for t in replies) / len(replies) for name, fn in MEASURES.items()}

    n = len(wordings)
    rows = [{"measure": m, "side": side, "wording": d, "prompt": means(i), "adapter": means(n + i)}
            for i, (m, side, d) in enumerate(wordings)]
    base = means(2 * n)
    md = "\n".join([
        "# Which wordings move their attribute? (`python -m benchmarks.diagnostics.control_screen`)", "",
        f"Each wording as the base model's system prompt, and as the adapter checkpoint {gen.id[:12]} generates "
        f"from it (no system prompt); {len(queries)} training queries, greedy, at most {args.max_tokens} tokens; "
        "mean of the wording's own measure (every measure is in screen.json). A side is the low end of its "
        "measure, B the high end.", "",
        *report.table(["measure", "side", "base", "system prompt", "adapter", "wording"],
                      [(r["measure"], r["side"], f"{base[r['measure']]:.3g}", f"{r['prompt'][r['measure']]:.3g}",
                        f"{r['adapter'][r['measure']]:.3g}", r["wording"]) for r in rows])])
    report.write(Path(args.out), "screen", md, {"context": report.context("benchmarks.diagnostics.control_screen"),
                                                "checkpoint": gen.id, "queries": queries,
                                                "max_tokens": args.max_tokens, "base": base, "rows": rows})
    print(md)


if __name__ == "__main__":
    main()
