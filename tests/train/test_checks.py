"""Every check type accepts compliant replies and rejects non-compliant ones; bad specs fail loudly."""

from __future__ import annotations

import pytest

from vllm_t2l.train.checks import (
    CHECKS,
    MEASURES,
    check,
    formality,
    pirate,
    sentiment,
    sports_vs_food,
    upper_share,
    word_count,
    words,
)

CASES = [  # (spec, replies that comply, replies that do not)
    ({"type": "all_caps"},
     ["THE SKY IS BLUE BECAUSE OF RAYLEIGH SCATTERING!", "YES, 42."],
     ["THE SKY IS Blue.", "1234 !!!", "ÉCOLE est fermée"]),
    ({"type": "all_lowercase"},
     ["the sky is blue, lol", "i think it's 42."],
     ["The sky is blue.", "ok NASA said so", "... 42 ..."]),
    ({"type": "max_words", "n": 5},
     ["Paris.", "It is in France, mate."],
     ["The capital of France is Paris, of course."]),
    ({"type": "min_words", "n": 6},
     ["one two three four five six", "Well, the answer really depends on context."],
     ["Too short.", "a b c d e"]),
    ({"type": "ends_with", "text": "Amen"},
     ["Be kind to one another. Amen.", "Drink water, amen!!  \n", 'He said "Amen"'],
     ["Amen, be kind.", "Be kind to one another."]),
    ({"type": "ends_with", "text": "Sold!"},
     ["Going once, going twice... SOLD!", "and that's a wrap. Sold"],
     ["Sold to the lady in red."]),
    ({"type": "starts_with", "text": "Ahoy"},
     ["Ahoy, matey! The sea be salty.", "  \nahoy there."],
     ["Well, ahoy.", "Aho y"]),
    ({"type": "bullet_list"},
     ["- first\n- second", "Points:\n* one\n  * two", "• apples\n•pears"],
     ["- only one bullet", "**Bold** start\n**Another** bold line", "---\n---", "first - second - third"]),
    ({"type": "numbered_list"},
     ["1. Preheat the oven.\n2. Mix the flour.", "Steps:\n 1) boil\n 2) stir"],
     ["1. Only one step.", "In 2023. Then in 2024.", "Step one, step two."]),
    ({"type": "contains", "text": "banana"},
     ["Have a BANANA for energy.", "bananas are great"],
     ["Have an apple."]),
    ({"type": "no_commas"},
     ["No commas here. Just full stops."],
     ["Well, that has one."]),
    ({"type": "question_mark_end"},
     ["Paris is the capital. What else would you like to know?", 'She asked "why?"  '],
     ["Why? Because.", "Is it? Yes it is!"]),
    ({"type": "exclamations", "n": 3},
     ["Wow! Amazing! Incredible!", "Yes!!!"],
     ["Wow! Amazing.", "No exclamations."]),
]


@pytest.mark.parametrize("spec,good,bad", CASES, ids=[c[0]["type"] for c in CASES])
def test_check_passes_and_fails(spec: dict, good: list[str], bad: list[str]) -> None:
    for reply in good:
        assert check(spec, reply), f"{spec} should accept {reply!r}"
    for reply in bad:
        assert not check(spec, reply), f"{spec} should reject {reply!r}"


def test_cases_cover_every_type() -> None:
    assert {c[0]["type"] for c in CASES} == set(CHECKS)


@pytest.mark.parametrize("spec", [c[0] for c in CASES], ids=[c[0]["type"] for c in CASES])
def test_blank_reply_never_complies(spec: dict) -> None:
    assert not check(spec, "")
    assert not check(spec, "  \n\t")


@pytest.mark.parametrize("spec,match", [
    ({"type": "rhymes"}, "unknown check type 'rhymes'"),
    ({"text": "Amen"}, "'type' key"),
    ("all_caps", "'type' key"),
    ({"type": "max_words"}, "integer 'n'"),
    ({"type": "min_words", "n": "10"}, "integer 'n'"),
    ({"type": "exclamations", "n": True}, "integer 'n'"),
    ({"type": "max_words", "n": -1}, "integer 'n'"),
    ({"type": "ends_with"}, "string 'text'"),
    ({"type": "starts_with", "text": "   "}, "string 'text'"),
    ({"type": "contains", "text": 3}, "string 'text'"),
])
def test_bad_spec_raises(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check(spec, "any reply")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        check(spec, "")  # type: ignore[arg-type]


# ---- graded measures ----


def test_words_and_word_count() -> None:
    assert words("Don\u2019t panic, it's 42 o'clock!") == ["don't", "panic", "it's", "o'clock"]
    assert word_count("  one two\nthree  ") == 3.0
    assert word_count("") == 0.0


def test_upper_share() -> None:
    assert upper_share("ABC def") == 0.5
    assert upper_share("SHOUTING, 42!") == 1.0
    assert upper_share("quiet") == 0.0
    assert upper_share("1234 !!!") == 0.0  # no letters: not a division by zero


def test_formality_orders_registers() -> None:
    formal = "Therefore, individuals shall ensure sufficient assistance is provided."
    casual = "Yeah dude, it's totally cool, don't worry lol."
    neutral = "The sun heats the air near the ground."
    assert formality(formal) > formality(neutral) == 0.0 > formality(casual)
    assert formality("Yeah yeah") == -100.0  # per 100 words
    assert formality("I can't") == -50.0  # a contraction counts as informal


def test_sentiment_orders_moods() -> None:
    happy = "What a wonderful, amazing question! I love it."
    gloomy = "Sadly, it is hopeless and everything will fail."
    assert sentiment(happy) > sentiment("The box is red.") == 0.0 > sentiment(gloomy)
    assert sentiment("Great but awful.") == 0.0  # one of each cancels


def test_pirate_counts_markers_not_topics() -> None:
    assert pirate("Arr, ahoy matey!") == 100.0
    assert pirate("The ship sailed the sea for treasure.") == 0.0
    assert pirate("Aye, the ship is yer own.") == 2 * 100.0 / 6


def test_sports_vs_food_orders_analogy_domains() -> None:
    sports = "Think of it like a team game: the coach sets the goal and players score."
    food = "Think of it like a recipe: the chef mixes ingredients and bakes in the oven."
    assert sports_vs_food(sports) > sports_vs_food("The box is red.") == 0.0 > sports_vs_food(food)
    assert sports_vs_food("The team ate soup.") == 0.0  # one of each cancels


def test_measures_are_zero_for_blank_replies() -> None:
    for name, fn in MEASURES.items():
        assert fn("") == fn("  \n") == 0.0, name
        assert fn("!!! 42") == (2.0 if name == "words" else 0.0), name
