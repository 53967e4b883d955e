"""Programmatic compliance checks for alignment prompts.

A prompt in `data/prompts.jsonl` may carry a `check` spec such as ``{"type": "ends_with", "text": "Amen"}``.
Evaluation uses these to score whether a generated adapter really changed behaviour, without a judge model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Trailing characters a model adds after a sign-off ("Amen!", "...Over.'") that must not defeat ends_with.
_CLOSING = " \t\r\n.!?\"'"
_BULLET = re.compile(r"^\s*(?:[-*]\s+|•\s*)\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)


def _int_param(spec: dict, name: str) -> int:
    value = spec.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"check {spec.get('type')!r} needs a non-negative integer {name!r}, got {value!r}")
    return value


def _text_param(spec: dict, name: str = "text") -> str:
    value = spec.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"check {spec.get('type')!r} needs a non-empty string {name!r}, got {value!r}")
    return value


def _all_caps(spec: dict, reply: str) -> bool:
    return any(c.isalpha() for c in reply) and not any(c.islower() for c in reply)


def _all_lowercase(spec: dict, reply: str) -> bool:
    return any(c.isalpha() for c in reply) and not any(c.isupper() for c in reply)


def _max_words(spec: dict, reply: str) -> bool:
    return len(reply.split()) <= _int_param(spec, "n")


def _min_words(spec: dict, reply: str) -> bool:
    return len(reply.split()) >= _int_param(spec, "n")


def _ends_with(spec: dict, reply: str) -> bool:
    # The target is stripped too, so a spec written as "Sold!" behaves like "Sold".
    target = _text_param(spec).rstrip(_CLOSING).lower()
    return reply.rstrip(_CLOSING).lower().endswith(target)


def _starts_with(spec: dict, reply: str) -> bool:
    return reply.lstrip().lower().startswith(_text_param(spec).lower())


def _bullet_list(spec: dict, reply: str) -> bool:
    # A marker must be followed by whitespace for - and *, so **bold** lines and --- rules do not count.
    return len(_BULLET.findall(reply)) >= 2


def _numbered_list(spec: dict, reply: str) -> bool:
    return len(_NUMBERED.findall(reply)) >= 2


def _contains(spec: dict, reply: str) -> bool:
    return _text_param(spec).lower() in reply.lower()


def _no_commas(spec: dict, reply: str) -> bool:
    return "," not in reply


def _question_mark_end(spec: dict, reply: str) -> bool:
    return reply.rstrip(" \t\r\n\"'").endswith("?")


def _exclamations(spec: dict, reply: str) -> bool:
    return reply.count("!") >= _int_param(spec, "n")


CHECKS: dict[str, Callable[[dict, str], bool]] = {
    "all_caps": _all_caps,
    "all_lowercase": _all_lowercase,
    "max_words": _max_words,
    "min_words": _min_words,
    "ends_with": _ends_with,
    "starts_with": _starts_with,
    "bullet_list": _bullet_list,
    "numbered_list": _numbered_list,
    "contains": _contains,
    "no_commas": _no_commas,
    "question_mark_end": _question_mark_end,
    "exclamations": _exclamations,
}


def check(spec: dict, reply: str) -> bool:
    """True when `reply` complies with `spec`.

    A blank reply never complies: degenerate empty generations would otherwise pass max_words and no_commas
    and inflate compliance scores.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"check spec must be a dict with a 'type' key, got {spec!r}")
    fn = CHECKS.get(spec["type"])
    if fn is None:
        raise ValueError(f"unknown check type {spec['type']!r}; expected one of {sorted(CHECKS)}")
    result = fn(spec, reply)  # evaluated first so a bad spec raises even for a blank reply
    return result and bool(reply.strip())


# ---- graded measures -------------------------------------------------------------------------
# Where a check says yes or no, a measure gives a number, so a dial between two behaviours can be scored
# (benchmarks/control.py). The lexicons are small on purpose: they score clear markers, not nuance.

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_CONTRACTION = re.compile(r"[a-z]+(?:n't|'re|'m|'ll|'ve|'d)$")

FORMAL_WORDS = frozenset("""
therefore thus hence however furthermore moreover additionally consequently accordingly nevertheless
nonetheless whereas regarding concerning respectively approximately subsequently indeed shall
utilize facilitate demonstrate constitute comprise obtain ensure require sufficient significant
individuals assistance inquiry regards sincerely kindly esteemed certainly primarily
""".split())
INFORMAL_WORDS = frozenset("""
yeah yep nope hey hi ok okay cool awesome dude bro guys gonna wanna gotta kinda sorta stuff
lol omg btw ngl tbh totally super basically pretty literally chill vibe vibes y'all ya
""".split())
POSITIVE_WORDS = frozenset("""
good great wonderful amazing fantastic awesome excellent happy happiness joy joyful love lovely
beautiful bright brilliant delightful delight fun glad hope hopeful best enjoy exciting excited
cheerful fascinating incredible thrilled perfect smile success successful positive wow yay
marvelous sunny optimistic celebrate enthusiastic
""".split())
NEGATIVE_WORDS = frozenset("""
bad sad sadly gloomy gloom terrible awful worst worse fail fails failure hopeless pointless
doom doomed grim bleak sorrow pain painful suffer suffering despair miserable misery fear afraid
worry tragic tragedy broken lonely regret unfortunately decay dread dreary futile loss
pessimistic melancholy cruel
""".split())
# Markers only: sea, ship or treasure would also score answers that merely talk about sailing.
PIRATE_WORDS = frozenset("""
arr arrr ahoy matey mateys ye yer aye avast savvy shiver timbers landlubber landlubbers scallywag
scallywags hearties booty grog plunder buccaneer buccaneers doubloons yo ho
""".split())


# Analogy domains: training teaches "explain everything with <domain> analogies" (audience family).
SPORTS_WORDS = frozenset("""
sport sports team teams teammate teammates game games match coach coaches player players goal goals score
scored scoring ball field court league season halftime referee tournament champion championship athlete
athletes training win winning wins defense offense playbook
""".split())
FOOD_WORDS = frozenset("""
food cook cooking cooked recipe recipes ingredient ingredients kitchen meal meals dish dishes bake baking
oven flavor flavors flavour taste tasty spice spices chef sauce soup bread dough salt sugar delicious
simmer stir bowl
""".split())


def words(reply: str) -> list[str]:
    """Lowercased words, keeping an inner apostrophe ("don't"); digits and punctuation dropped."""
    return _WORD.findall(reply.lower().replace("\u2019", "'"))


def word_count(reply: str) -> float:
    """Whitespace-separated words, as max_words and min_words count them."""
    return float(len(reply.split()))


def upper_share(reply: str) -> float:
    """Share of capital letters among all letters; 0 when there are none."""
    letters = [c for c in reply if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def lexicon_balance(reply: str, plus: frozenset[str], minus: frozenset[str],
                    minus_pattern: re.Pattern | None = None) -> float:
    """(words in ``plus`` - words in ``minus``) per 100 words; 0 for a reply without words."""
    ws = words(reply)
    if not ws:
        return 0.0
    hits = sum(w in plus for w in ws) - sum(w in minus or bool(minus_pattern and minus_pattern.match(w))
                                            for w in ws)
    return 100.0 * hits / len(ws)


def formality(reply: str) -> float:
    """Formal minus informal markers per 100 words; contractions count as informal."""
    return lexicon_balance(reply, FORMAL_WORDS, INFORMAL_WORDS, _CONTRACTION)


def sentiment(reply: str) -> float:
    """Positive minus negative words per 100 words."""
    return lexicon_balance(reply, POSITIVE_WORDS, NEGATIVE_WORDS)


def pirate(reply: str) -> float:
    """Pirate-speech markers per 100 words."""
    return lexicon_balance(reply, PIRATE_WORDS, frozenset())


def sports_vs_food(reply: str) -> float:
    """Sports words minus food words per 100 words: which domain an answer draws its analogies from."""
    return lexicon_balance(reply, SPORTS_WORDS, FOOD_WORDS)


MEASURES: dict[str, Callable[[str], float]] = {
    "words": word_count,
    "upper_share": upper_share,
    "formality": formality,
    "sentiment": sentiment,
    "pirate": pirate,
    "sports_vs_food": sports_vs_food,
}
