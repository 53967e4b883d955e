"""Which opposite descriptions does the base model itself follow? The screen behind control.py's pairs.

    python -m benchmarks.control_screen [--queries 12]

A control curve can only move an attribute that the teacher (the base model with the description as its
system prompt) moves: there is nothing to distil otherwise. This answers 12 TRAINING queries (never the
benchmark's held-out ones) with each candidate wording as the system prompt and reports every measure, so
the pairs in control.py are the wordings that moved their attribute most. Writes
benchmarks/results/control/screen.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import report
from benchmarks.control import check_unseen, spread
from vllm_t2l.models import prepare_default_model
from vllm_t2l.train import data
from vllm_t2l.train.checks import MEASURES

CANDIDATES: dict[str, dict[str, list[str]]] = {
    "words": {"A": ["Please keep your replies as short as you can: a few words at most.",
                    "Answer in one brief sentence and stop.",
                    "Reply with just a few words, nothing more.",
                    "Be extremely brief: give only the bare answer, no explanation."],
              "B": ["Please give long, detailed replies with background, examples and advice.",
                    "Explain at great length, with many details and several examples.",
                    "Write a long, thorough explanation covering every aspect of the question."]},
    "upper_share": {"A": ["Type your whole answer in small letters, with no capitals anywhere.",
                          "write everything in lowercase, like a lazy text message, no capitals at all.",
                          "reply in all lowercase only."],
                    "B": ["Type your whole answer in capital letters, with no small letters anywhere.",
                          "WRITE EVERYTHING IN CAPITAL LETTERS, LIKE YOU ARE SHOUTING.",
                          "Reply in ALL CAPS only."]},
    "formality": {"A": ["Answer casually, like a laid-back friend: slang, contractions and no fuss.",
                        "Talk like a chill surfer dude texting a buddy: yeah, cool, totally.",
                        "Be super casual and chatty, like texting your best friend, lol."],
                  "B": ["Answer formally, in polished and professional language, like an official letter.",
                        "Respond in a formal, courteous and professional manner, as a distinguished butler would.",
                        "Register: formal business English, precise and impersonal."]},
    "sentiment": {"A": ["Tone: gloomy and pessimistic, expecting the worst from every topic.",
                        "Be miserable and bleak: everything is terrible, sad and hopeless.",
                        "Answer in a sad, despairing tone, as if everything is doomed to fail."],
                  "B": ["Tone: cheerful and optimistic, delighted by every topic.",
                        "Be joyful and enthusiastic: everything is wonderful, amazing and exciting!",
                        "Answer with happy, upbeat excitement, celebrating how great everything is."]},
    "pirate": {"A": ["Use plain, modern, neutral English.",
                     "Speak like a precise modern scientist."],
               "B": ["Talk like a pirate: arr, matey, ahoy, ye and aye in every sentence.",
                     "You are a salty old pirate captain. Speak like one."]},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/control")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from vllm_t2l.serving.offline import answer

    queries = spread([q["text"] for q in data.load_queries() if q["split"] == "train"], args.queries)
    wordings = [(m, side, d) for m, sides in CANDIDATES.items() for side, ds in sides.items() for d in ds]
    check_unseen([d for *_, d in wordings])
    wordings.append(("base", "-", ""))
    model_dir = prepare_default_model()
    convs = [([{"role": "system", "content": d}] if d else []) + [{"role": "user", "content": q}]
             for *_, d in wordings for q in queries]
    outs = answer(model_dir, convs, args.max_tokens, 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    rows = []
    for i, (m, side, d) in enumerate(wordings):
        replies = texts[i * len(queries):(i + 1) * len(queries)]
        means = {name: sum(fn(t) for t in replies) / len(replies) for name, fn in MEASURES.items()}
        rows.append({"measure": m, "side": side, "wording": d, "means": means})
    md = "\n".join([
        "# Which wordings does the base model follow? (`python -m benchmarks.control_screen`)", "",
        f"Base model with each wording as its system prompt, {len(queries)} training queries, greedy, at most "
        f"{args.max_tokens} tokens; mean of every measure. A side is the low end of its measure, B the high end.", "",
        *report.table(["measure", "side", *MEASURES, "wording"],
                      [(r["measure"], r["side"], *(f"{v:.3g}" for v in r["means"].values()), r["wording"] or "(none)")
                       for r in rows])])
    report.write(Path(args.out), "screen", md, {"context": report.context("benchmarks.control_screen"),
                                                "queries": queries, "max_tokens": args.max_tokens, "rows": rows})
    print(md)


if __name__ == "__main__":
    main()
