"""Teacher outputs for context distillation, computed once and cached.

Teacher = the base model with the description as its system prompt. For each (description, query)
it answers greedily (through vLLM's offline engine, far faster than HF generate on a CPU); we keep
the answer and the teacher's top-k next-token log-probabilities at every answer position (the rest
of the distribution is one "tail" bucket in the loss).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_t2l.train.student import Student


@dataclass
class Sample:
    prompt_id: str
    description: str
    query: str
    student_prompt: list[int]  # chat prompt without the description
    response: list[int]  # the teacher's greedy answer
    top_ids: torch.Tensor  # [len(response), k]
    top_logp: torch.Tensor  # [len(response), k]


def pairs(prompts: list[dict], queries: list[dict], per_prompt: int, seed: int,
          all_descriptions: bool = True) -> list[tuple[dict, str, dict]]:
    """(prompt, description text, query) triples: each prompt meets ``per_prompt`` random queries,
    cycling through its paraphrases so every wording is used."""
    rng = random.Random(seed)
    out = []
    for p in prompts:
        descs = p["descriptions"] if all_descriptions else p["descriptions"][:1]
        for j, q in enumerate(rng.sample(queries, min(per_prompt, len(queries)))):
            out.append((p, descs[j % len(descs)], q))
    return out


def build(student: Student, model_dir: str | Path, triples: list[tuple[dict, str, dict]], max_new_tokens: int,
          top_k: int) -> list[Sample]:
    """Teacher answers through vLLM's engine; the student's prompts come from the same chat template."""
    from vllm_t2l.serving.offline import answer

    conversations = [[{"role": "system", "content": d}, {"role": "user", "content": q["text"]}]
                     for _, d, q in triples]
    answers = answer(model_dir, conversations, max_new_tokens, top_k)
    return [Sample(p["id"], d, q["text"], student.prompt_ids(q["text"]), a.token_ids, a.top_ids, a.top_logp)
            for (p, d, q), a in zip(triples, answers) if a.token_ids]


def save(samples: list[Sample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save([vars(s) for s in samples], tmp)
    tmp.replace(path)


def load(path: Path) -> list[Sample]:
    return [Sample(**d) for d in torch.load(path, weights_only=True)]
