"""The project's own training data, shipped as package data so training works from an installed wheel.

- ``prompts.jsonl``: alignment prompts (behaviours) for context distillation, each with paraphrased
  descriptions, a family, a split (train / heldout_prompt / heldout_family) and an optional compliance
  check (see ``vllm_t2l.train.checks``).
- ``queries.jsonl``: generic user queries the teacher and student both answer (split train / heldout).
- ``task_sft.jsonl``: small supervised tasks with phrasings of the task and input/output examples.
- ``dials.jsonl``: the poles of four dials (short/long, cheerful/gloomy, pirate/plain, casual/formal), each a
  style of ``vllm_t2l.train.dials`` with its wordings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent


def _read_jsonl(name: str) -> list[dict]:
    with (DATA_DIR / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_prompts() -> list[dict]:
    return _read_jsonl("prompts.jsonl")


def load_queries() -> list[dict]:
    return _read_jsonl("queries.jsonl")


def load_tasks() -> list[dict]:
    return _read_jsonl("task_sft.jsonl")


def load_dials() -> list[dict]:
    return _read_jsonl("dials.jsonl")


def composites(prompts: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` more behaviours for training: two training descriptions from different families, said together
    (a persona that must also keep to a format, ...), as one-description prompts without a check."""
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    by_family: dict[str, list[dict]] = {}
    for p in prompts:
        by_family.setdefault(p["family"], []).append(p)
    families = sorted(by_family)
    if len(families) < 2:
        raise ValueError("composites need prompts from at least two families")
    while len(out) < n:
        pair = rng.sample(families, 2)
        text = " ".join(rng.choice(rng.choice(by_family[f])["descriptions"]) for f in pair)
        if text not in seen:
            seen.add(text)
            out.append({"id": f"composite-{len(out)}", "family": "composite", "split": "train",
                        "descriptions": [text], "check": None})
    return out
