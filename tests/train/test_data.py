"""The shipped training data is well formed, split as documented, and (for mechanical tasks) correct."""

from __future__ import annotations

import calendar
import re
from collections import Counter

import pytest

from vllm_t2l.train.checks import check
from vllm_t2l.train.data import DATA_DIR, composites, load_prompts, load_queries, load_tasks

PROMPT_SPLITS = {"train", "heldout_prompt", "heldout_family"}
SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


def norm(text: str) -> str:
    return " ".join(text.casefold().split())


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return load_prompts()


@pytest.fixture(scope="module")
def queries() -> list[dict]:
    return load_queries()


@pytest.fixture(scope="module")
def tasks() -> list[dict]:
    return load_tasks()


def test_files_exist() -> None:
    for name in ("prompts.jsonl", "queries.jsonl", "task_sft.jsonl"):
        assert (DATA_DIR / name).is_file()


# ---------------------------------------------------------------- prompts


def test_prompt_fields(prompts: list[dict]) -> None:
    for p in prompts:
        assert set(p) == {"id", "family", "split", "descriptions", "check"}, p.get("id")
        assert SLUG.match(p["id"]), p["id"]
        assert SLUG.match(p["family"].replace("_", "-")), p["family"]
        assert p["split"] in PROMPT_SPLITS, p["id"]
        assert p["check"] is None or isinstance(p["check"], dict), p["id"]
        descs = p["descriptions"]
        assert len(descs) >= 6, p["id"]
        for d in descs:
            assert isinstance(d, str) and d == d.strip() and len(d.split()) >= 3, (p["id"], d)
        assert len({norm(d) for d in descs}) == len(descs), f"repeated description in {p['id']}"


def test_prompt_counts(prompts: list[dict]) -> None:
    assert len(prompts) >= 320
    assert len({p["family"] for p in prompts}) >= 7
    assert len({p["id"] for p in prompts}) == len(prompts), "duplicate prompt ids"


def test_no_description_shared_between_prompts(prompts: list[dict]) -> None:
    owner: dict[str, str] = {}
    for p in prompts:
        for d in p["descriptions"]:
            key = norm(d)
            assert owner.setdefault(key, p["id"]) == p["id"], f"{d!r} in {owner[key]} and {p['id']}"


def test_splits(prompts: list[dict]) -> None:
    by_family: dict[str, Counter] = {}
    for p in prompts:
        by_family.setdefault(p["family"], Counter())[p["split"]] += 1
    heldout_families = [f for f, c in by_family.items() if c["heldout_family"]]
    assert len(heldout_families) == 1, heldout_families
    assert set(by_family[heldout_families[0]]) == {"heldout_family"}
    for fam, counts in by_family.items():
        if fam == heldout_families[0]:
            continue
        total = sum(counts.values())
        assert counts["train"] and counts["heldout_prompt"], fam
        assert 0.08 <= counts["heldout_prompt"] / total <= 0.25, (fam, counts)


def test_checks(prompts: list[dict]) -> None:
    checkable = [p for p in prompts if p["check"]]
    assert len(checkable) >= 60
    assert sum(p["split"] != "train" for p in checkable) >= 12
    assert any(p["split"] == "heldout_prompt" for p in checkable)
    for p in checkable:
        check(p["check"], "A sample reply.")  # raises ValueError on a malformed spec


def test_checked_text_is_stated_in_every_description(prompts: list[dict]) -> None:
    """A student can only learn a marker word the descriptions actually name (symbols may be described)."""
    for p in prompts:
        text = (p["check"] or {}).get("text", "")
        if re.fullmatch(r"[\w' ,]+", text):
            for d in p["descriptions"]:
                assert text.casefold() in d.casefold(), (p["id"], d)


# ---------------------------------------------------------------- queries


def test_queries(queries: list[dict]) -> None:
    assert len(queries) >= 400
    assert len({q["id"] for q in queries}) == len(queries)
    assert len({norm(q["text"]) for q in queries}) == len(queries), "duplicate query text"
    for q in queries:
        assert set(q) == {"id", "split", "text"}
        assert re.fullmatch(r"q\d{4}", q["id"]), q["id"]
        assert q["split"] in {"train", "heldout"}
        assert q["text"] == q["text"].strip() and len(q["text"].split()) >= 2, q
    share = sum(q["split"] == "heldout" for q in queries) / len(queries)
    assert 0.15 <= share <= 0.25


# ---------------------------------------------------------------- tasks


def _roman_value(numeral: str) -> int:
    vals = [{"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}[c] for c in numeral]
    return sum(-v if i + 1 < len(vals) and v < vals[i + 1] else v for i, v in enumerate(vals))


_DAYS = list(calendar.day_name)
REFERENCE = {  # independent re-implementations of every mechanical task
    "reverse-word": lambda x: x[::-1],
    "uppercase-sentence": str.upper,
    "lowercase-sentence": str.lower,
    "sort-three-words": lambda x: " ".join(sorted(x.split(), key=str.casefold)),
    "count-words": lambda x: str(len(x.split())),
    "word-length": lambda x: str(len(x)),
    "acronym": lambda x: "".join(w[0].upper() for w in x.split()),
    "extract-number": lambda x: "".join(c for c in x if c.isdigit()),
    "add-numbers": lambda x: str(int(x.split(" + ")[0]) + int(x.split(" + ")[1])),
    "multiply-numbers": lambda x: str(int(x.split(" x ")[0]) * int(x.split(" x ")[1])),
    "subtract-numbers": lambda x: str(int(x.split(" - ")[0]) - int(x.split(" - ")[1])),
    "larger-number": lambda x: str(max(int(v) for v in x.split(" and "))),
    "title-case": lambda x: " ".join(w.capitalize() for w in x.split()),
    "remove-vowels": lambda x: "".join(c for c in x if c.lower() not in "aeiou"),
    "last-word": lambda x: x.split()[-1].strip(".,!?"),
    "sort-numbers": lambda x: ", ".join(str(v) for v in sorted(int(v) for v in x.split(","))),
    "odd-or-even": lambda x: ("odd", "even")[int(x) % 2 == 0],
    "count-vowels": lambda x: str(sum(x.count(v) for v in "aeiou")),
    "reverse-word-order": lambda x: " ".join(x.split()[::-1]),
    "celsius-to-fahrenheit": lambda x: str(round(int(x) * 1.8 + 32)),
    "alphabet-position": lambda x: str("abcdefghijklmnopqrstuvwxyz".index(x) + 1),
    "weekday-plus": lambda x: _DAYS[(_DAYS.index(x.split(" + ")[0]) + int(x.split(" + ")[1])) % 7],
    "month-name": lambda x: calendar.month_name[int(x)],
    "snake-case": lambda x: re.sub(r"\s+", "_", x.strip().lower()),
    "is-palindrome": lambda x: "yes" if x == "".join(reversed(x)) else "no",
    "count-letter": lambda x: str(x.split("word: ")[1].count(x.split("letter: ")[1][0])),
    "question-or-statement": lambda x: "question" if x.rstrip().endswith("?") else "statement",
}


def test_task_fields(tasks: list[dict]) -> None:
    assert len(tasks) >= 30
    assert len({t["task"] for t in tasks}) == len(tasks)
    for t in tasks:
        assert set(t) == {"task", "split", "descriptions", "examples"}
        assert SLUG.match(t["task"]), t["task"]
        assert t["split"] in {"train", "heldout"}
        assert len(t["descriptions"]) >= 3 and len(set(t["descriptions"])) == len(t["descriptions"])
        assert len(t["examples"]) >= 8, t["task"]
        inputs = [e["input"] for e in t["examples"]]
        assert len(set(inputs)) == len(inputs), f"repeated input in {t['task']}"
        for e in t["examples"]:
            assert set(e) == {"input", "output"}, t["task"]
            assert isinstance(e["input"], str) and isinstance(e["output"], str)
            assert e["input"].strip() and e["output"].strip(), t["task"]
    share = sum(t["split"] == "heldout" for t in tasks) / len(tasks)
    assert 0.15 <= share <= 0.3


def test_mechanical_task_outputs(tasks: list[dict]) -> None:
    by_name = {t["task"]: t for t in tasks}
    assert set(REFERENCE) <= set(by_name), set(REFERENCE) - set(by_name)
    for name, fn in REFERENCE.items():
        for e in by_name[name]["examples"]:
            assert fn(e["input"]) == e["output"], (name, e)
    for e in by_name["roman-numerals"]["examples"]:  # parse the numeral back rather than re-derive it
        assert _roman_value(e["output"]) == int(e["input"]), e


def test_composites_join_two_training_descriptions_from_different_families(prompts):
    train = [p for p in prompts if p["split"] == "train"]
    family_of = {d: p["family"] for p in train for d in p["descriptions"]}
    made = composites(train, 200, seed=3)
    assert made == composites(train, 200, seed=3) != composites(train, 200, seed=4)
    texts = [c["descriptions"][0] for c in made]
    assert len(set(texts)) == 200 and {c["split"] for c in made} == {"train"}
    for text in texts:
        parts = [(d, f) for d, f in family_of.items() if text.startswith(d + " ") or text.endswith(" " + d)]
        assert len({f for _, f in parts}) == 2, text
    with pytest.raises(ValueError, match="two families"):
        composites([p for p in train if p["family"] == "persona"], 1, seed=0)
