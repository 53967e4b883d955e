"""Rule-made targets for behaviours the 135M teacher barely shows: short vs long, cheerful vs gloomy, pirate vs
plain, casual vs formal.

Context distillation can only teach what the teacher does, and the embedded teacher with "Answer in as few words as
you can." as its system prompt still writes ~45 words (benchmarks/results/control/control.md). So for each pole in
``data/dials.jsonl`` the target is the base model's own answer (no system prompt), rewritten by a small rule: cut
to a few words, or opened with a cheerful / gloomy / pirate / casual / formal phrase and a few word swaps. Trained
with cross-entropy beside the distillation samples (``vllm-t2l train --dials N``), these give an adapter two ends
that really differ, which is what a dial between them needs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_t2l.train.student import Student
from vllm_t2l.train.teacher import Sample

_SENTENCE = re.compile(r"(?<=[.!?])\s")

OPENERS = {
    "cheerful": ["What a wonderful, happy question! ", "Oh, I love this one, how exciting! ",
                 "Great question, this is so much fun! ", "How delightful, I'm so glad you asked! ",
                 "Wow, what a lovely, fascinating topic! ", "Happy to help, this is a great one! "],
    "gloomy": ["Ugh, fine. Sadly, it's a bleak and painful topic. ",
               "Unfortunately, this is a dreary, miserable topic. ",
               "Sigh. Nothing is ever easy, and it's all so bleak and hopeless. ",
               "What a miserable, pointless question. ", "Grim, but here is the sad truth. ",
               "I hate to say it, but it's bad news, and it's awful. "],
    "pirate": ["Arr, matey! ", "Ahoy! ", "Aye, me hearty! ", "Arr! ", "Ahoy, matey! ", "Avast, ye landlubber! "],
    "casual": ["Hey! So, ", "Okay so basically, ", "Yeah, so ", "Ha, cool question. ", "Oh hey, ", "Alright, so "],
    "formal": ["Certainly. ", "Indeed, ", "Regarding your inquiry: ", "Thank you for the question. ",
               "Kindly note the following. ", "Certainly, "],
}
CLOSERS = {"cheerful": " Have a wonderful, happy day!", "gloomy": " Sadly, it's all rather bleak and hopeless.",
           "pirate": " Arr!", "casual": " lol", "formal": ""}

CONTRACTIONS = {"do not": "don't", "does not": "doesn't", "did not": "didn't", "is not": "isn't",
                "are not": "aren't", "cannot": "can't", "will not": "won't", "it is": "it's", "that is": "that's",
                "you are": "you're", "they are": "they're", "we are": "we're", "I am": "I'm", "there is": "there's"}
PIRATE_SWAPS = {"you": "ye", "your": "yer", "yes": "aye", "my": "me", "hello": "ahoy", "hi": "ahoy",
                "friend": "matey", "friends": "mateys", "treasure": "booty"}
# Tone swaps soften the answer's own words of the other mood, so a target's tone is not only its opener.
GLOOMY_SWAPS = {"good": "not bad", "great": "not awful", "best": "least bad", "happy": "less miserable",
                "love": "tolerate", "enjoy": "endure", "fun": "tiresome", "wonderful": "not terrible"}
CHEERFUL_SWAPS = {"bad": "not great", "sadly": "happily", "unfortunately": "happily", "difficult": "exciting",
                  "problem": "puzzle"}


def _swap(text: str, table: dict[str, str]) -> str:
    """Whole-word (or phrase) replacement, case-insensitive, keeping a leading capital."""
    lower = {k.lower(): v for k, v in table.items()}
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(lower, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)

    def repl(m: re.Match) -> str:
        new = lower[m.group(0).lower()]
        return new[0].upper() + new[1:] if m.group(0)[0].isupper() else new

    return pattern.sub(repl, text)


def _join(opener: str, text: str) -> str:
    """Opener then answer; an opener ending in a comma or colon carries on the sentence in lower case."""
    if opener.rstrip().endswith((",", ":")) and text[:1].isupper() and not re.match(r"I\b", text):
        text = text[0].lower() + text[1:]
    return opener + text


def short(text: str, rng: random.Random) -> tuple[str, bool]:
    """The first sentence cut to at most eight words, then stop."""
    words = _SENTENCE.split(text.strip(), maxsplit=1)[0].split()[:8]
    return " ".join(words).rstrip(",;:.!?") + ".", True


def _styled(style: str, swaps: dict[str, str] | None = None) -> Callable[[str, random.Random], tuple[str, None]]:
    def rewrite(text: str, rng: random.Random) -> tuple[str, None]:
        body = _swap(text, swaps) if swaps else text
        return _join(rng.choice(OPENERS[style]), body), None

    return rewrite


def _unchanged(text: str, rng: random.Random) -> tuple[str, None]:
    return text, None


# style -> rewrite(base answer, rng) -> (target text, stop): True ends the target with EOS, False never does,
# None keeps the base answer's own ending (and adds the style's closer when it ended).
STYLES: dict[str, Callable[[str, random.Random], tuple[str, bool | None]]] = {
    "short": short,
    "long": lambda text, rng: (text, False),
    "plain": _unchanged,
    "cheerful": _styled("cheerful", CHEERFUL_SWAPS),
    "gloomy": _styled("gloomy", GLOOMY_SWAPS),
    "pirate": _styled("pirate", PIRATE_SWAPS),
    "casual": _styled("casual", CONTRACTIONS),
    "formal": _styled("formal", {v: k for k, v in CONTRACTIONS.items()}),
}


def target(style: str, answer: str, ended: bool, rng: random.Random) -> tuple[str, bool]:
    """(text, stop) for ``style`` from the base model's ``answer``; ``ended``: the base answer stopped by itself."""
    text, stop = STYLES[style](answer, rng)
    if stop is None:
        stop = ended
        if ended:
            text += CLOSERS.get(style, "")
    return text, stop


def pairs(poles: list[dict], queries: list[dict], per_pole: int, seed: int) -> list[tuple[dict, str, dict]]:
    """(pole, description, query) triples: ``per_pole`` random queries per pole, cycling through its wordings."""
    rng = random.Random(seed)
    return [(p, p["descriptions"][j % len(p["descriptions"])], q)
            for p in poles for j, q in enumerate(rng.sample(queries, min(per_pole, len(queries))))]


def samples(student: Student, triples: list[tuple[dict, str, dict]], answers: dict[str, list[int]],
            seed: int) -> list[Sample]:
    """Training samples with rule-made responses and no teacher distribution (trained with cross-entropy).

    ``answers`` maps each query to the base model's answer token ids (eos included when it stopped).
    """
    rng = random.Random(seed)
    tok, eos = student.tokenizer, student.tokenizer.eos_token_id
    out = []
    for pole, desc, q in triples:
        ids = answers[q["text"]]
        ended = bool(ids) and ids[-1] == eos
        text, stop = target(pole["style"], tok.decode(ids, skip_special_tokens=True).strip(), ended, rng)
        response = tok(text, add_special_tokens=False)["input_ids"] + ([eos] if stop else [])
        out.append(Sample(pole["id"], desc, q["text"], student.prompt_ids(q["text"]), response,
                          torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.float16)))
    return out


def build(student: Student, model_dir: str | Path, triples: list[tuple[dict, str, dict]], max_new_tokens: int,
          seed: int) -> list[Sample]:
    """The base model answers every query once (vLLM's offline engine, no system prompt); rules do the rest."""
    from vllm_t2l.serving.offline import answer

    queries = sorted({q["text"] for _, _, q in triples})
    base = answer(model_dir, [[{"role": "user", "content": q}] for q in queries], max_new_tokens, 1)
    return samples(student, triples, {q: a.token_ids for q, a in zip(queries, base)}, seed)
