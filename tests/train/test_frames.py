"""Frames wrap a description in words that say "every time" and nothing about the behaviour."""

from __future__ import annotations

import re

from vllm_t2l.train.frames import FRAMES, framed, variants


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_a_frame_keeps_every_word_of_the_description_and_adds_only_its_own():
    for text in ("Talk like a pirate.", "Be terse", "Reply in CAPS only!"):
        for frame in FRAMES:
            out = framed(text, frame)
            assert words(out) == words(text) | words(frame.format(text="", lower="", bare="")), (text, out)


def test_the_first_letter_is_lowered_mid_sentence_unless_the_word_is_in_capitals():
    assert framed("Talk like a pirate.", "In every answer, {lower}") == "In every answer, talk like a pirate."
    assert framed("Talk like a pirate.", "{bare} in every answer.") == "Talk like a pirate in every answer."
    assert framed("CAPS only.", "From now on, {lower}") == "From now on, CAPS only."
    assert framed("  Be terse!  ", "Always: {text}") == "Always: Be terse!"


def test_variants_give_each_text_one_wording_per_frame():
    out = variants(["Talk like a pirate.", "Be terse."])
    assert list(out) == ["Talk like a pirate.", "Be terse."]
    assert all(len(set(v)) == len(FRAMES) and t not in v for t, v in out.items())
