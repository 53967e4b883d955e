"""The student as a generator: plain greedy answers and the amplified teacher."""

from __future__ import annotations

import pytest

QUERY = "How do I boil an egg?"
PIRATE = "Talk like a pirate in every answer."


def test_guidance_one_is_the_plain_prompted_answer(student):
    prompted, plain = student.prompt_ids(QUERY, system=PIRATE), student.prompt_ids(QUERY)
    assert student.generate([prompted], 24, unprompted=[plain], guidance=1.0) == student.generate([prompted], 24)


@pytest.mark.parametrize("padded", [False, True])
def test_amplified_answer_moves_past_the_prompt_and_batches_like_one(student, padded):
    """g = 2 changes the answer (the 135M model under-follows its prompt), and left padding in a batch does not."""
    prompted, plain = student.prompt_ids(QUERY, system=PIRATE), student.prompt_ids(QUERY)
    alone = student.generate([prompted], 24, unprompted=[plain], guidance=2.0)[0]
    assert alone != student.generate([prompted], 24)[0]
    if padded:
        other = student.prompt_ids("Why is the sky blue? Explain it to a child in a few sentences.", system=PIRATE)
        assert student.generate([other, prompted], 24, unprompted=[student.prompt_ids("Hi"), plain],
                                guidance=2.0)[1] == alone
