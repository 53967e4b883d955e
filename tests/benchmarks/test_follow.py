"""The follow benchmark's descriptions and attribute counters (the served run: `python -m benchmarks.follow`)."""

from __future__ import annotations

import pytest

from benchmarks.control import check_unseen
from benchmarks.follow import (
    MEASURES,
    bars,
    earlier_teacher,
    load_descriptions,
    repetition,
    summarise,
    write_report,
)


def test_descriptions_are_many_varied_and_unseen_in_training():
    rows = load_descriptions()
    assert len(rows) >= 40 and len({r["behaviour"] for r in rows}) >= 10
    check_unseen([r["description"] for r in rows])


@pytest.mark.parametrize("measure, param, low, high", [
    ("words", None, "Yes.", "Boil the water, then add the egg and wait."),
    ("upper_share", None, "Boil it.", "BOIL IT."),
    ("bullets", None, "Boil it. Then eat it.", "- Boil it.\n- Eat it."),
    ("ends_with", "Namaste", "Namaste, friend.", "Boil it. Namaste!"),
    ("line_error", 2, "One.\nTwo.", "One.\nTwo.\nThree.\nFour."),
    ("pirate", None, "Boil the egg.", "Arr, matey, boil the egg!"),
    ("exclamations", None, "Boil it.", "Boil it! Now!"),
    ("food", None, "Run fast.", "Season the sauce like a chef."),
    ("sports", None, "Boil it.", "The team scored a goal."),
    ("question_end", None, "Boil it.", "Boil it. Ready?"),
])
def test_measures_order_answers(measure, param, low, high):
    assert MEASURES[measure](low, param) < MEASURES[measure](high, param)


def test_repetition_sees_loops():
    assert repetition("a rainbow. a rainbow. a rainbow. a rainbow.") > 0.5
    assert repetition("Boil the water, then add the egg.") == 0


def test_bars_read_the_recommended_strength_against_the_system_prompt():
    summary = {"system prompt": {"moved": 0.6, "median_shift": 0.4, "median_ppl": 2.0},
               "strength 2": {"moved": 0.95, "median_shift": 0.8, "median_ppl": 2.9}}
    b = bars({"summary": summary, "recommended": 2.0})
    assert b["moved_met"] and b["shift_met"] and b["ppl_met"] and b["shift_ratio"] == pytest.approx(2.0)
    summary["strength 2"]["median_ppl"] = 3.01  # 1.505x the system prompt's
    assert not bars({"summary": summary, "recommended": 2.0})["ppl_met"]


def test_a_system_prompt_that_moves_nothing_leaves_the_shift_bar_unmet():
    summary = {"system prompt": {"moved": 0.3, "median_shift": 0.0, "median_ppl": 2.0},
               "strength 2": {"moved": 0.5, "median_shift": 0.03, "median_ppl": 2.2}}
    assert not bars({"summary": summary, "recommended": 2.0})["shift_met"]


def test_report_shows_each_behaviour_and_the_mean_shift(tmp_path):
    conditions = ["system prompt", "teacher", "strength 1"]
    rows = [{"behaviour": b, "description": f"{b} {i}", "measure": "words",
             "mean": dict.fromkeys(["base", *conditions], 1.0),
             "shift": {"system prompt": 0.0, "teacher": 1.0, "strength 1": shift},
             "ppl": dict.fromkeys(conditions, 2.0), "repetition": dict.fromkeys(conditions, 0.0)}
            for b, i, shift in [("brevity", 0, 1.0), ("brevity", 1, -1.0), ("pirate", 0, 3.0)]]
    summary = summarise(rows, conditions)
    assert summary["strength 1"]["mean_shift"] == pytest.approx(1.0) and summary["strength 1"]["median_shift"] == 1.0
    write_report({"command": "x", "date": "d", "rows": rows, "queries": ["q"], "max_tokens": 8, "checkpoint": "c",
                  "guidance": 2.0, "base_ppl": 2.0, "conditions": conditions, "summary": summary, "recommended": 1.0,
                  "strengths": [1.0], "seconds": {}}, tmp_path)
    md = (tmp_path / "follow.md").read_text()
    assert "| brevity | 2 | 0% | 100% | 50% |" in md and "| pirate | 1 | 0% | 100% | 100% |" in md


def test_teacher_answers_are_reused_only_from_a_run_that_asked_the_same():
    descs = [{"description": "Be brief."}, {"description": "Shout."}]
    old = {"queries": ["q1", "q2"], "max_tokens": 80, "guidance": 2.0,
           "answers": {d["description"]: {"teacher": [d["description"] + " a1", "a2"], "strength 2": ["x", "y"]}
                       for d in descs}}
    assert earlier_teacher(old, descs, ["q1", "q2"], 80, 2.0) == {"Be brief.": ["Be brief. a1", "a2"],
                                                                    "Shout.": ["Shout. a1", "a2"]}
    for queries, tokens, g in ((["q1"], 80, 2.0), (["q1", "q2"], 200, 2.0), (["q1", "q2"], 80, 3.0)):
        with pytest.raises(ValueError, match="other queries, --max-tokens or --guidance"):
            earlier_teacher(old, descs, queries, tokens, g)
    with pytest.raises(ValueError, match="lacks 1 of the descriptions, such as 'Be calm.'"):
        earlier_teacher(old, [*descs, {"description": "Be calm."}], ["q1", "q2"], 80, 2.0)
