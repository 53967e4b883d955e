"""Rule-made dial targets: each style moves its own measure, the data is unseen by the control benchmark, and a
sample forces only the tokens a rule wrote, leaving the rest to the teacher."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.control import PAIRS, check_unseen
from vllm_t2l.train import dials, objectives, teacher
from vllm_t2l.train.checks import (
    FOOD_WORDS,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    SPORTS_WORDS,
    formality,
    lexicon_balance,
    pirate,
    sentiment,
    word_count,
    words,
)
from vllm_t2l.train.data import load_dials, load_prompts
from vllm_t2l.train.dials import rule_made

ANSWERS = [
    "The capital of France is Paris. It is a lovely city, and you do not need a visa if you are from the EU.",
    "Photosynthesis is how plants turn light into sugar. They take in carbon dioxide and water, and my "
    "friend the biology teacher says it is the basis of nearly all life on Earth.",
    "I can't be sure, but it's likely that the train will be late. You're better off leaving early.",
]


def rewrite(style: str, text: str, ended: bool = True) -> tuple[str, bool]:
    return dials.target(style, text, ended, random.Random(0))


@pytest.mark.parametrize("text", ANSWERS)
def test_each_style_moves_its_own_measure(text):
    short, stop = rewrite("short", text)
    assert stop and word_count(short) <= 8 and short.endswith(".")
    assert rewrite("long", text) == (text, False)
    assert rewrite("plain", text) == (text, True) and rewrite("plain", text, ended=False) == (text, False)
    assert sentiment(rewrite("cheerful", text)[0]) > sentiment(text) > sentiment(rewrite("gloomy", text)[0])
    assert pirate(rewrite("pirate", text)[0]) > pirate(text) == 0
    assert formality(rewrite("casual", text)[0]) < formality(text) <= formality(rewrite("formal", text)[0])
    assert "'" not in rewrite("formal", text)[0]
    assert rewrite("exclaim", text)[0].count("!") > text.count("!") and "." not in rewrite("exclaim", text)[0][-1]
    asked, stop = rewrite("question", text, ended=False)
    assert stop and asked.endswith("?") and asked.startswith(text.split(".")[0])
    for style, lexicon in [("chef", FOOD_WORDS), ("sports", SPORTS_WORDS)]:
        assert lexicon_balance(rewrite(style, text)[0], lexicon, frozenset()) > lexicon_balance(text, lexicon,
                                                                                                frozenset())


@pytest.mark.parametrize("style, own, other", [("cheerful", POSITIVE_WORDS, NEGATIVE_WORDS),
                                                ("gloomy", NEGATIVE_WORDS, POSITIVE_WORDS)])
def test_tone_phrases_carry_two_words_of_their_mood_and_none_of_the_other(style, own, other):
    for phrase in dials.OPENERS[style] + [dials.CLOSERS[style]]:
        found = words(phrase)
        assert sum(w in own for w in found) >= 2 and not any(w in other for w in found), phrase


def test_tone_swaps_take_out_the_other_mood():
    text = "It is a good, fun game, but sadly the rules are a bad problem."
    assert dials._swap(text, dials.GLOOMY_SWAPS) == \
        "It is a not bad, tiresome game, but sadly the rules are a bad problem."
    assert dials._swap(text, dials.CHEERFUL_SWAPS) == \
        "It is a good, fun game, but happily the rules are a not great puzzle."


def test_closers_only_follow_an_answer_that_ended():
    text = ANSWERS[0]
    assert rewrite("pirate", text, ended=True)[0].endswith("Arr!")
    cut, stop = rewrite("pirate", text, ended=False)
    assert not stop and not cut.endswith("Arr!")


def test_word_swaps_keep_case_and_whole_words():
    assert dials._swap("You and your yes-man; yesterday, my friends.", dials.PIRATE_SWAPS) == \
        "Ye and yer aye-man; yesterday, me mateys."
    assert dials._swap("I'm sure it's fine.", {v: k for k, v in dials.CONTRACTIONS.items()}) == \
        "I am sure it is fine."


def test_dial_data_names_known_styles_in_new_wordings():
    poles = load_dials()
    assert sorted(p["style"] for p in poles) == sorted([*dials.STYLES, *dials.PARAM_STYLES])
    for p in poles:
        assert (p["style"] in dials.PARAM_STYLES) == ("params" in p)
        assert len(p.get("params", p["descriptions"])) == len(p["descriptions"])
    trained = {d for p in load_prompts() for d in p["descriptions"]}
    for p in poles:
        assert len(set(p["descriptions"])) >= 8 and not trained & set(p["descriptions"])
    check_unseen([d for pair in PAIRS for d in (pair.a, pair.b)])  # the control wordings stay held out
    with pytest.raises(SystemExit, match="training data"):
        check_unseen([poles[0]["descriptions"][0]])
    reworded = "Please, " + poles[0]["descriptions"][0].lower()  # one more word is still the same wording
    with pytest.raises(SystemExit, match="near-copies"):
        check_unseen([reworded])


def test_pairs_give_each_pole_its_queries_and_every_wording():
    poles = load_dials()
    n = max(len(p["descriptions"]) for p in poles)
    queries = [{"text": f"q{i}"} for i in range(n + 6)]
    triples = dials.pairs(poles, queries, n, seed=0)
    assert triples == dials.pairs(poles, queries, n, seed=0) != dials.pairs(poles, queries, n, seed=1)
    for pole in poles:
        mine = [(d, q["text"]) for p, d, q in triples if p is pole]
        assert len(mine) == n and len({q for _, q in mine}) == n
        assert {d for d, _ in mine} == set(pole["descriptions"])


BASE = "To boil an egg, place it in a pot of water. Bring it to a boil and wait nine minutes. Then cool it in"


@pytest.mark.parametrize("style,param,expect,stop", [
    ("caps", None, BASE.upper(), False),
    ("bullets", None, "- To boil an egg, place it in a pot of water.\n- Bring it to a boil and wait nine minutes."
                      "\n- Then cool it in", False),
    ("lines", 2, "To boil an egg, place it in a pot of water.\nBring it to a boil and wait nine minutes.", True),
    ("words", 5, "To boil an egg, place.", True),
    ("signoff", "Cheers", "To boil an egg, place it in a pot of water. Bring it to a boil and wait nine minutes."
                          "\nCheers", True),
])
def test_format_rules(style, param, expect, stop):
    assert dials.target(style, BASE, False, random.Random(0), param) == (expect, stop)


def test_line_rule_deals_words_when_sentences_are_too_few():
    text, stop = dials.target("lines", "One two three four five six.", True, random.Random(0), 3)
    assert text.split("\n") == ["One two", "three four", "five six."] and stop


def test_a_wordings_param_follows_the_wording():
    pole = next(p for p in load_dials() if p["style"] == "signoff")
    assert all(dials.param(pole, d) in d for d in pole["descriptions"])
    assert dials.param({"descriptions": ["x"]}, "x") is None


def test_rule_made_marks_openers_swaps_and_cuts_but_not_the_answer():
    base = "You can see the stars. They are far away."
    text = "Arr, matey! ye can see the stars. They are far away. Arr!"
    assert "".join(c for c, m in zip(text, rule_made(base, text)) if m) == "Arr,matey!yeArr!"
    assert rule_made(base, base) == [False] * len(base)
    assert not any(rule_made(base, "You can see the stars."))  # a cut keeps the words it keeps


def test_samples_force_the_rule_and_leave_the_answer_to_the_teacher(student):
    eos = student.tokenizer.eos_token_id
    poles = {p["style"]: p for p in load_dials()}
    query = {"text": "What is the capital of France?"}
    base = student.tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"]
    triples = [(poles[style], poles[style]["descriptions"][i], query)
               for i, style in enumerate(["short", "long", "pirate"])]
    short, long, pirate = dials.samples(student, triples, {query["text"]: base + [eos]}, seed=0, top_k=4)
    assert short.response[-1] == eos and eos not in long.response
    assert student.tokenizer.decode(short.response[:-1]) == rewrite("short", ANSWERS[0])[0]
    assert student.tokenizer.decode(long.response) == ANSWERS[0]
    assert short.student_prompt == student.prompt_ids(query["text"]) and short.prompt_id == "dial-short"
    for s in (short, long, pirate):
        assert s.top_ids.shape == s.top_logp.shape == (len(s.response), 4)
        assert s.top_ids.dtype == torch.int32 and s.top_logp.dtype == torch.float16
    forced = lambda s: dials.token_weights(s.top_logp, 8.0) == 8.0  # noqa: E731
    assert set(dials.token_weights(pirate.top_logp, 8.0).tolist()) == {1.0, 8.0}
    assert not forced(long).any() and forced(short).tolist() == [False] * (len(short.response) - 1) + [True]
    tokens = [student.tokenizer.decode([t]) for t in pirate.response]
    assert "".join(t for t, f in zip(tokens, forced(pirate)) if f) == "Arr! ye ye Arr!<|im_end|>"

    # A forced row is a one-hot teacher: the KL is that token's cross-entropy. Elsewhere it is the teacher itself.
    logits = torch.randn(len(pirate.response), len(student.tokenizer))
    kl = objectives.distill_kl(logits, pirate.top_ids, pirate.top_logp)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(pirate.response), reduction="none")
    assert torch.allclose(kl[forced(pirate)], ce[forced(pirate)], atol=1e-4)
    teacher = student.logits(student.make_batch([student.prompt_ids(query["text"], system=long.description)],
                                                [long.response]))
    top = torch.log_softmax(teacher, -1).topk(4, -1)
    assert torch.equal(long.top_ids, top.indices.to(torch.int32))
    assert torch.allclose(long.top_logp.float(), top.values, atol=1e-2)


def test_training_refuses_dial_samples_cached_by_an_older_version(student, tmp_path):
    from vllm_t2l.train.loop import TrainConfig, _examples

    old = teacher.Sample("dial-short", "Be terse.", "q", [1], [2, 3], torch.zeros(0), torch.zeros(0))
    taught = teacher.Sample("p", "d", "q", [1], [2], torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 4))
    teacher.save([taught], tmp_path / "teacher-train.pt")
    teacher.save([old], tmp_path / "dials.pt")
    with pytest.raises(ValueError, match="dials.pt holds dial samples without teacher rows"):
        _examples(TrainConfig(dials=1), student, tmp_path, tmp_path)


def test_pole_weights_name_a_known_pole_and_a_finite_weight():
    poles = load_dials()
    assert dials.pole_weights(("dial-short=32", "dial-gloomy=2.5"), poles) == {"dial-short": 32.0, "dial-gloomy": 2.5}
    assert dials.pole_weights((), poles) == {}
    for bad, says in [("dial-shortt=3", "one of"), ("short=3", "one of"), ("dial-short", "POLE=WEIGHT"),
                      ("dial-short=nan", "finite"), ("dial-short=-1", ">= 0"), ("dial-short=inf", "finite"),
                      ("dial-short=lots", "finite")]:
        with pytest.raises(ValueError, match=says):
            dials.pole_weights((bad,), poles)
