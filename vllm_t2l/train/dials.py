"""Rule-made targets for behaviours the 135M teacher barely shows: short vs long, cheerful vs gloomy, pirate vs
plain, casual vs formal (the four dials), personas (a chef, a sports coach), and formats it cannot show even with its
prompt amplified: all capitals, bullets, exclamations, a closing question, a line count, a word limit, a sign-off
word.

Context distillation can only teach what the teacher does, and the embedded teacher with "Answer in as few words as
you can." as its system prompt still writes ~45 words (benchmarks/results/control/control.md). So for each pole in
``data/dials.jsonl`` the target is the base model's own answer (no system prompt), rewritten by a small rule: cut
to a few words, or opened with a cheerful / gloomy / pirate / casual / formal phrase and a few word swaps. Trained
beside the distillation samples (``vllm-t2l train --dials N``), these give an adapter two ends that really differ,
which is what a dial between them needs. Only the tokens a rule wrote are forced; the rest of the answer is
distilled from the teacher like any other sample (``samples``).
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

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
    "exclaim": ["Wow! ", "Oh, amazing! ", "Yes! ", "How exciting! ", "Woohoo! ", "Oh wow! "],
    "chef": ["Like any good recipe, this needs the right ingredients. ", "As a chef would say in the kitchen: ",
             "Let's cook this up like a tasty dish! ", "Think of it as a recipe, one ingredient at a time. ",
             "In my kitchen, every answer is a meal. ", "Time to stir the pot and taste the answer. "],
    "sports": ["Game on, team! ", "Like a coach at halftime: ", "Let's score this one, team. ",
               "Here's the playbook for this game. ", "Time to win this match! ", "Coach's call, players: "],
}
CLOSERS = {"cheerful": " Have a wonderful, happy day!", "gloomy": " Sadly, it's all rather bleak and hopeless.",
           "pirate": " Arr!", "casual": " lol", "formal": "", "exclaim": " Amazing!",
           "chef": " Tasty, like a good meal!", "sports": " Go team, that's a win!"}
QUESTIONS = [" What do you think?", " Does that help?", " Would you like to know more?", " Have you tried it?",
             " Shall I explain further?", " What would you do?"]

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


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s]


def _complete(text: str) -> str:
    """The answer without a trailing unfinished sentence (answers are cut at a token budget)."""
    parts = _sentences(text)
    done = [s for s in parts if s.endswith((".", "!", "?"))]
    return " ".join(done) if done else text.strip().rstrip(",;:") + "."


def exclaim(text: str, rng: random.Random) -> tuple[str, None]:
    """An excited opener, and every sentence ending in an exclamation mark."""
    return _join(rng.choice(OPENERS["exclaim"]), re.sub(r"\.(?=\s|$)", "!", text)), None


def question(text: str, rng: random.Random) -> tuple[str, bool]:
    """The answer's complete sentences, then a question back to the reader."""
    return _complete(text) + rng.choice(QUESTIONS), True


def caps(text: str, rng: random.Random) -> tuple[str, None]:
    return text.upper(), None


def bullets(text: str, rng: random.Random) -> tuple[str, None]:
    """One sentence per line, each after a dash."""
    return "\n".join("- " + s for s in _sentences(text)), None


def lines(text: str, rng: random.Random, n: int) -> tuple[str, bool]:
    """Exactly ``n`` lines: the first ``n`` sentences, or the words dealt evenly when there are fewer."""
    parts = _sentences(_complete(text))
    if len(parts) < n:
        words = " ".join(parts).split()
        size = max(1, math.ceil(len(words) / n))
        parts = [" ".join(words[i * size:(i + 1) * size]) for i in range(n)]
    return "\n".join(p for p in parts[:n] if p), True


def word_limit(text: str, rng: random.Random, n: int) -> tuple[str, bool]:
    """At most ``n`` words, ending on a full stop."""
    return " ".join(text.split()[:n]).rstrip(",;:.!?") + ".", True


def signoff(text: str, rng: random.Random, word: str) -> tuple[str, bool]:
    """The answer's complete sentences, then the sign-off word on its own line."""
    return f"{_complete(text)}\n{word}", True


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
    "chef": _styled("chef"),
    "sports": _styled("sports"),
    "exclaim": exclaim,
    "caps": caps,
    "bullets": bullets,
    "question": question,
}
# Styles with a parameter per wording (a pole's "params", one per description): the count, the limit, the word.
PARAM_STYLES: dict[str, Callable[..., tuple[str, bool]]] = {"lines": lines, "words": word_limit, "signoff": signoff}


def target(style: str, answer: str, ended: bool, rng: random.Random, param=None) -> tuple[str, bool]:
    """(text, stop) for ``style`` from the base model's ``answer``; ``ended``: the base answer stopped by itself;
    ``param``: the wording's parameter for a style in ``PARAM_STYLES``."""
    if style in PARAM_STYLES:
        return PARAM_STYLES[style](answer, rng, param)
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


def param(pole: dict, description: str):
    """The parameter of one of a pole's wordings (None for a pole without ``params``)."""
    params = pole.get("params")
    return params[pole["descriptions"].index(description)] if params else None


RULED_LOGP = -1e4  # the other top-k entries of a rule-made token's one-hot row: exp() is 0 in fp16 and fp32


def token_weights(top_logp: Tensor, ruled_weight: float | Tensor) -> Tensor:
    """Loss weight per teacher row: ``ruled_weight`` (one number, or one per row) where a rule wrote the token, 1
    elsewhere. A short answer's only rule-made tokens are its cut and early EOS, two rows in a batch of hundreds,
    too faint to learn at weight 1."""
    return torch.where(top_logp[:, 1] == RULED_LOGP, ruled_weight, 1.0)


def pole_weights(entries: tuple[str, ...], poles: list[dict]) -> dict[str, float]:
    """``("dial-short=32", ...)`` -> {pole id: weight}. Poles differ in how much a rule writes (an opener is a
    quarter of a tone answer, a cut one token of a short one), so one weight for all of them over- or under-shoots."""
    ids, out = {p["id"] for p in poles}, {}
    for entry in entries:
        pole, sep, value = entry.partition("=")
        if not sep or pole not in ids:
            raise ValueError(f"pole weight {entry!r}: expected POLE=WEIGHT with POLE one of {sorted(ids)}")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"pole weight {entry!r}: the weight must be a finite number >= 0")
        out[pole] = weight
    return out


def rule_made(base: str, text: str) -> list[bool]:
    """Per character of ``text``: True where a rule wrote it (opener, swapped word, closer), False where it is the
    base answer's own text or a space, so a token like " The" after an opener is still the answer's."""
    out = [not c.isspace() for c in text]
    for block in difflib.SequenceMatcher(None, base, text, autojunk=False).get_matching_blocks():
        out[block.b: block.b + block.size] = [False] * block.size
    return out


@torch.no_grad()
def samples(student: Student, triples: list[tuple[dict, str, dict]], answers: dict[str, list[int]], seed: int,
            top_k: int = 16, batch_size: int = 16) -> list[Sample]:
    """Training samples whose tokens are taught two ways: where a rule wrote the token (and the final EOS), a
    one-hot row, so the KL is the cross-entropy of that token; elsewhere the teacher's top-k, the base model with
    the pole's wording as its system prompt, exactly as every distilled answer is taught. Only what the rule adds
    is forced, so the body of a dial answer does not pull adapters back towards the no-prompt base model.

    ``answers`` maps each query to the base model's answer token ids (eos included when it stopped). ``student``
    must have no adapters installed: its plain forward pass is the teacher.
    """
    rng = random.Random(seed)
    tok, eos = student.tokenizer, student.tokenizer.eos_token_id
    out, ruled = [], []
    for pole, desc, q in triples:
        ids = answers[q["text"]]
        base = tok.decode(ids, skip_special_tokens=True).strip()
        text, stop = target(pole["style"], base, bool(ids) and ids[-1] == eos, rng, param(pole, desc))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        chars = rule_made(base, text)
        ruled.append(torch.tensor([any(chars[a:b]) for a, b in enc["offset_mapping"]] + ([True] if stop else [])))
        out.append(Sample(pole["id"], desc, q["text"], student.prompt_ids(q["text"]),
                          enc["input_ids"] + ([eos] if stop else []), torch.zeros(0), torch.zeros(0)))
    for i in range(0, len(out), batch_size):
        chunk = out[i: i + batch_size]
        batch = student.make_batch([student.prompt_ids(s.query, system=s.description) for s in chunk],
                                   [s.response for s in chunk])
        top = torch.log_softmax(student.logits(batch), -1).topk(top_k, -1)
        rows = torch.cumsum(torch.tensor([0] + [len(s.response) for s in chunk]), 0).tolist()
        for s, mask, a, b in zip(chunk, ruled[i: i + batch_size], rows, rows[1:]):
            ids, logp = top.indices[a:b].clone(), top.values[a:b].clone()
            ids[mask, 0], logp[mask, 0], logp[mask, 1:] = torch.tensor(s.response)[mask], 0.0, RULED_LOGP
            s.top_ids, s.top_logp = ids.to(torch.int32), logp.to(torch.float16)
    return out


def build(student: Student, model_dir: str | Path, triples: list[tuple[dict, str, dict]], max_new_tokens: int,
          seed: int, top_k: int) -> list[Sample]:
    """The base model answers every query once (vLLM's offline engine, no system prompt); rules do the rest."""
    from vllm_t2l.serving.offline import answer

    queries = sorted({q["text"] for _, _, q in triples})
    base = answer(model_dir, [[{"role": "user", "content": q}] for q in queries], max_new_tokens, 1)
    return samples(student, triples, {q: a.token_ids for q, a in zip(queries, base)}, seed, top_k)
