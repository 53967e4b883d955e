"""Control curves: sweep the mix weight between two opposite descriptions and measure what moves.

    python -m benchmarks.control [--checkpoint DIR] [--pairs 4] [--queries 24] [--points 13] [--max-tokens 64]
                                 [--samples 2] [--temperature 0.7]

For each pair (A, B) and w in -0.25 .. 1.25 (step 0.125) the adapter is the mix (1-w)*A + w*B, in weight
space (`t2l-mix[weight]:`) and in description space (`t2l-mix[emb]:`). vLLM's offline engine answers
held-out queries with every adapter, and with the references that do not depend on w: the base
model, and the base model with each description as its system prompt. Answers are sampled, several per
query, with seeds that depend only on (query, sample), never on w: every point of a sweep draws the same
random numbers (common random numbers), so the curve shows how the expected attribute moves with w, not
sampling noise. A single greedy answer per query (--temperature 0) turns each query into a step function.
Per point it records every pair's attribute (entanglement), and fluency as perplexity of the answer under
the base model given the chat-formatted query without a system prompt. Writes
benchmarks/results/control/control.{md,json,png}; adapters and answers go to runs/control/.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.report import context
from vllm_t2l.generator import Generator
from vllm_t2l.lora import LoRAWeights
from vllm_t2l.models import DEFAULT_CHECKPOINT, prepare_default_model
from vllm_t2l.names import AdapterSpec, Mode, parse
from vllm_t2l.train import data
from vllm_t2l.train.checks import MEASURES
from vllm_t2l.train.student import Student

MODES: tuple[Mode, ...] = ("weight", "emb")
GRID = [-0.25 + 0.125 * i for i in range(13)]
SPEARMAN_BAR, PPL_BAR = 0.9, 1.5


@dataclass(frozen=True)
class Pair:
    name: str
    measure: str  # a key of checks.MEASURES, expected to rise from a to b
    a: str
    b: str


# Worded like the training families (length, persona, register, tone), but none is a training prompt. Each side is
# the candidate wording whose generated ADAPTER moved its attribute most on training queries
# (benchmarks/diagnostics/control_screen.py, screen.md; ties go to the first listed): an adapter can only dial
# between what its two endpoint adapters do. Capital letters and sports-vs-food analogies are not pairs: neither the
# base model's system prompts nor the adapters move them (screen.md).
PAIRS = [
    Pair("length", "words", "Please keep your replies as short as you can: a few words at most.",
         "Write a long, thorough explanation covering every aspect of the question."),
    Pair("pirate", "pirate", "Use plain, modern, neutral English.",
         "You are a salty old pirate captain. Speak like one."),
    Pair("formality", "formality", "Be super casual and chatty, like texting your best friend, lol.",
         "Write in a formal academic register with precise, impersonal wording."),
    Pair("sentiment", "sentiment", "Sound grumpy and negative: complain about everything.",
         "Tone: cheerful and optimistic, delighted by every topic."),
]


def mix_name(pair: Pair, mode: Mode, w: float, strength: float = 1.0) -> str:
    options = mode if strength == 1 else f"{mode},strength={strength:g}"
    return f"t2l-mix[{options}]:{1 - w!r}*{pair.a}||{w!r}*{pair.b}"


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation; nan when either side is constant (no movement is no monotone movement)."""
    from scipy.stats import spearmanr  # installed with vLLM

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


@torch.no_grad()
def answer_nll(student: Student, prompts: list[list[int]], answers: list[list[int]],
               batch_size: int = 16) -> list[tuple[float, int]]:
    """Summed negative log-likelihood and token count of each answer under the model as it is.

    Many points of a sweep give the same answer to a query, so each distinct (prompt, answer) is scored once.
    """
    unique = sorted({(tuple(p), tuple(a)) for p, a in zip(prompts, answers) if a}, key=lambda x: len(x[0]) + len(x[1]))
    scores: dict[tuple, tuple[float, int]] = {}
    for start in tqdm(range(0, len(unique), batch_size), desc="perplexity", unit="batch"):
        chunk = unique[start:start + batch_size]
        batch = student.make_batch([list(p) for p, _ in chunk], [list(a) for _, a in chunk])
        per_token = torch.nn.functional.cross_entropy(student.logits(batch), batch.targets, reduction="none")
        offset = 0
        for key in chunk:
            scores[key] = (per_token[offset:offset + len(key[1])].sum().item(), len(key[1]))
            offset += len(key[1])
    return [scores[(tuple(p), tuple(a))] if a else (0.0, 0) for p, a in zip(prompts, answers)]


def relative_distance(a: LoRAWeights, b: LoRAWeights) -> float:
    """||dW_b - dW_a|| / ||dW_a||, Frobenius over every layer and module: how much B's adapter differs from A's."""
    norm = a.norm()
    return LoRAWeights.weighted_sum([b, a], [1.0, -1.0]).norm() / norm if norm else float("nan")


def summarise(rows: list[dict]) -> dict:
    """Mean of every measure over the queries, and perplexity over all their answer tokens."""
    tokens = sum(r["tokens"] for r in rows)
    return {**{m: sum(r[m] for r in rows) / len(rows) for m in MEASURES},
            "ppl": math.exp(sum(r["nll"] for r in rows) / tokens) if tokens else float("nan")}


def spread(items: list[str], n: int) -> list[str]:
    """``n`` items taken evenly over the list, so every part of the split is represented."""
    return items[:: max(1, len(items) // n)][:n]


# Word-set overlap (Jaccard) from which a held-out wording counts as a near-copy of a training one: "Answer as a
# bulleted list." against "Format every answer as a bulleted list." is 0.71; unrelated wordings of one behaviour
# stay below 0.5.
NEAR_COPY = 0.6


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z']+", text.lower()))


def check_unseen(descriptions: list[str]) -> None:
    """Refuse wordings that are training prompts or dial poles, or near-copies of one (a reworded training
    line measures memory, not generalisation)."""
    trained = {d: _words(d) for p in data.load_prompts() + data.load_dials() for d in p["descriptions"]}
    if clash := [d for d in descriptions if d in trained]:
        raise SystemExit(f"these descriptions are in the training data: {clash}")
    near = [(d, t) for d, dw in ((d, _words(d)) for d in descriptions) for t, tw in trained.items()
            if len(dw & tw) >= NEAR_COPY * len(dw | tw)]
    if near:
        raise SystemExit(f"these descriptions are near-copies of training wordings: {near}")


def pick_grid(points: int) -> list[float]:
    """``points`` values spread over GRID, always with the endpoints 0 and 1."""
    idx = {round(i * (len(GRID) - 1) / max(1, points - 1)) for i in range(points)}
    return sorted({GRID[i] for i in idx} | {0.0, 1.0})


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--pairs", type=int, default=len(PAIRS), help="use the first N pairs")
    parser.add_argument("--queries", type=int, default=24, help="held-out queries, spread over the split")
    parser.add_argument("--points", type=int, default=len(GRID), help="weights taken from the 13-point grid")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2, help="answers per query and point (sampled)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: one greedy answer per query")
    parser.add_argument("--strength", type=float,
                        help="the strength every mix is served at (default: the one the checkpoint recommends)")
    parser.add_argument("--out", default="benchmarks/results/control")
    parser.add_argument("--work", default="runs/control")
    parser.add_argument("--report", metavar="JSON", help="only rewrite the tables and plot from a control.json")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()), Path(args.out))
        return
    started = time.time()
    pairs, grid = PAIRS[: args.pairs], pick_grid(args.points)
    check_unseen([d for p in pairs for d in (p.a, p.b)])
    queries = spread([q["text"] for q in data.load_queries() if q["split"] != "train"], args.queries)

    model_dir = prepare_default_model()
    gen = Generator.load(args.checkpoint)
    strength = gen.checkpoint.recommended_strength if args.strength is None else args.strength
    points = [(p, mode, w) for p in pairs for mode in MODES for w in grid]
    specs: list[AdapterSpec] = [parse(mix_name(p, mode, w, strength)) for p, mode, w in points]
    work = Path(args.work)
    folders, ends = [], {}
    for (p, mode, w), spec, lora in zip(points, specs, gen.generate(specs)):
        folder = work / "adapters" / spec.content_id(gen.id)
        folders.append(str(lora.save_peft(folder, model_dir.name, {"name": mix_name(p, mode, w, strength),
                                                                    "checkpoint": gen.id})))
        if mode == "weight" and w in (0.0, 1.0):
            ends[p.name, w] = lora
    distance = {p.name: relative_distance(ends[p.name, 0.0], ends[p.name, 1.0]) for p in pairs}
    t_adapters = time.time() - started

    refs = {"base": None, **{f"system {which}: {p.name}": d for p in pairs for which, d in (("A", p.a), ("B", p.b))}}
    greedy = args.temperature == 0
    draws = [(q, 1000 * k + i) for k in range(1 if greedy else args.samples) for i, q in enumerate(queries)]
    jobs = [(("point", i), [{"role": "user", "content": q}], f, seed)
            for i, f in enumerate(folders) for q, seed in draws]
    for name, system in refs.items():
        head = [{"role": "system", "content": system}] if system else []
        jobs += [(("ref", name), head + [{"role": "user", "content": q}], None, seed) for q, seed in draws]
    from vllm_t2l.serving.offline import answer

    t0 = time.time()
    outs = answer(model_dir, [j[1] for j in jobs], args.max_tokens, 1, adapters=[j[2] for j in jobs],
                  seeds=None if greedy else [j[3] for j in jobs], temperature=args.temperature)
    t_vllm = time.time() - t0

    t0 = time.time()
    student = Student(model_dir, ())
    prompts = [student.prompt_ids(j[1][-1]["content"]) for j in jobs]  # no system prompt, as the base sees it
    nll = answer_nll(student, prompts, [o.token_ids for o in outs])
    t_ppl = time.time() - t0
    rows: dict[tuple, list[dict]] = {}
    answers = []
    for (key, conv, *_), o, (s, n) in zip(jobs, outs, nll):
        text = student.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        rows.setdefault(key, []).append({**{m: fn(text) for m, fn in MEASURES.items()}, "nll": s, "tokens": n})
        answers.append({"key": list(key), "query": conv[-1]["content"], "answer": text})
    work.mkdir(parents=True, exist_ok=True)
    (work / "answers.json").write_text(json.dumps(answers, indent=1))

    result = {
        "checkpoint": {"path": args.checkpoint, "id": gen.id, "arch": gen.checkpoint.config.arch},
        "strength": strength,
        "queries": queries, "max_tokens": args.max_tokens, "grid": grid,
        "samples": 1 if greedy else args.samples, "temperature": args.temperature,
        "pairs": [vars(p) for p in pairs],
        "adapter_distance": distance,  # ||dW_B - dW_A|| / ||dW_A|| over all layers and modules
        "references": {name: {"mean": summarise(rows[("ref", name)]), "per_query": rows[("ref", name)]}
                       for name in refs},
        "points": [{"pair": p.name, "mode": mode, "w": w, "name": mix_name(p, mode, w, strength),
                    "adapter": Path(folders[i]).name, "mean": summarise(rows[("point", i)]),
                    "per_query": rows[("point", i)]} for i, (p, mode, w) in enumerate(points)],
    }
    result["seconds"] = {"adapters": t_adapters, "vllm_answers": t_vllm, "perplexity": t_ppl,
                         "total": time.time() - started}
    result["context"] = context("benchmarks.control")
    report(result, Path(args.out))


def report(result: dict, out: Path) -> None:
    """Summary, control.json, control.md and control.png from the raw numbers."""
    pairs = [Pair(**p) for p in result["pairs"]]
    result["summary"] = summary(result, pairs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "control.json").write_text(json.dumps(result, indent=1))
    write_report(result, pairs, out)
    plot(result, pairs, out)
    print((out / "control.md").read_text())


def curve(result: dict, pair: str, mode: str, key: str, inside: bool = False) -> tuple[list[float], list[float]]:
    pts = [p for p in result["points"] if p["pair"] == pair and p["mode"] == mode
           and (not inside or 0 <= p["w"] <= 1)]
    return [p["w"] for p in pts], [p["mean"][key] for p in pts]


def changed(result: dict, pair: Pair, mode: str) -> int:
    """(query, sample) draws whose answer at w=1 differs from the one at w=0 (a different likelihood: other tokens)."""
    ends = [next(p for p in result["points"] if p["pair"] == pair.name and p["mode"] == mode and p["w"] == w)
            for w in (0.0, 1.0)]
    return sum((a["nll"], a["tokens"]) != (b["nll"], b["tokens"])
               for a, b in zip(ends[0]["per_query"], ends[1]["per_query"]))


def summary(result: dict, pairs: list[Pair]) -> dict:
    """Per pair and mode: Spearman of every attribute vs w on [0, 1], its change, and the perplexity ratio."""
    out: dict = {}
    for p in pairs:
        for mode in MODES:
            ws, ppl = curve(result, p.name, mode, "ppl", inside=True)
            ends = max(ppl[ws.index(0.0)], ppl[ws.index(1.0)])
            row: dict = {"ppl_ratio": max(ppl) / ends, "attributes": {}, "answers_changed": changed(result, p, mode)}
            for other in pairs:
                _, ys = curve(result, p.name, mode, other.measure, inside=True)
                row["attributes"][other.name] = {"spearman": spearman(ws, ys),
                                                 "delta": ys[ws.index(1.0)] - ys[ws.index(0.0)]}
            own = row["attributes"][p.name]["spearman"]
            row["bar_met"] = bool(own >= SPEARMAN_BAR and row["ppl_ratio"] <= PPL_BAR)
            out[f"{p.name}/{mode}"] = row
    return out


def write_report(result: dict, pairs: list[Pair], out: Path) -> None:
    refs, summ = result["references"], result["summary"]
    ck = result["checkpoint"]
    temp, samples = result.get("temperature", 0.0), result.get("samples", 1)
    how = ("greedy" if temp == 0 else f"{samples} answers each, sampled at temperature {temp:g} with seeds shared "
           "by every w (common random numbers)")
    made = f"`{result['context']['command']}` ({result['context']['date']}). " if "context" in result else ""
    lines = [f"# Control curves ({ck['arch']} checkpoint {ck['id'][:12]})", "",
             f"{made}{len(result['queries'])} held-out queries, {how}, at most {result['max_tokens']} tokens. "
             f"Adapter = (1-w)·A + w·B at strength {result.get('strength', 1.0):g}. Attribute: mean over the answers. "
             "Spearman: attribute vs w over the points in "
             "[0, 1]. ppl ratio: highest perplexity on [0, 1] / the higher of the two endpoints (perplexity of "
             "the answers under the base model given the query, no system prompt). Bar: weight space, "
             f"Spearman ≥ {SPEARMAN_BAR} and ppl ratio ≤ {PPL_BAR}.", "",
             "| pair (attribute) | mode | w=0 | w=1 | system prompt A | system prompt B | Spearman | ppl ratio | "
             "answers changed, w=0 vs 1 | bar |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        a, b = refs[f"system A: {p.name}"]["mean"][p.measure], refs[f"system B: {p.name}"]["mean"][p.measure]
        for mode in MODES:
            ws, ys = curve(result, p.name, mode, p.measure)
            s = summ[f"{p.name}/{mode}"]
            lines.append(f"| {p.name} ({p.measure}) | {mode} | {ys[ws.index(0.0)]:.3g} | {ys[ws.index(1.0)]:.3g} | "
                         f"{a:.3g} | {b:.3g} | {s['attributes'][p.name]['spearman']:.2f} | {s['ppl_ratio']:.2f} | "
                         f"{s['answers_changed']}/{len(result['queries']) * samples} | "
                         f"{'met' if s['bar_met'] else 'not met'} |")
    lines += ["", "Descriptions (A → B), and how far apart their adapters are (||dW_B - dW_A|| / ||dW_A||):", ""]
    dist = result.get("adapter_distance", {})
    lines += [f"- {p.name}: A = “{p.a}” B = “{p.b}”" + (f" (distance {dist[p.name]:.2f})" if p.name in dist else "")
              for p in pairs]
    lines += ["", "## References (independent of w)", "",
              "| setup | " + " | ".join(p.measure for p in pairs) + " | ppl |", "|---|" + "---|" * (len(pairs) + 1)]
    for name, ref in refs.items():
        lines.append(f"| {name} | " + " | ".join(f"{ref['mean'][p.measure]:.3g}" for p in pairs)
                     + f" | {ref['mean']['ppl']:.2f} |")
    lines += ["", "## Entanglement", "",
              "Change of every attribute from w=0 to w=1 (Spearman vs w on [0, 1] in brackets). The diagonal is "
              "the attribute the pair is meant to move.", "",
              "| sweep | " + " | ".join(f"{p.name} ({p.measure})" for p in pairs) + " |",
              "|---|" + "---|" * len(pairs)]
    for p in pairs:
        for mode in MODES:
            cells = summ[f"{p.name}/{mode}"]["attributes"]
            lines.append(f"| {p.name} / {mode} | " + " | ".join(
                f"{cells[o.name]['delta']:+.3g} ({cells[o.name]['spearman']:.2f})" for o in pairs) + " |")
    lines += ["", "## Curves", ""]
    for p in pairs:
        lines += [f"### {p.name} ({p.measure})", "",
                  "| w | weight: attribute | weight: ppl | emb: attribute | emb: ppl |", "|---|---|---|---|---|"]
        for w in result["grid"]:
            cells = []
            for mode in MODES:
                pt = next(x for x in result["points"] if x["pair"] == p.name and x["mode"] == mode and x["w"] == w)
                cells += [f"{pt['mean'][p.measure]:.3g}", f"{pt['mean']['ppl']:.2f}"]
            lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
        lines.append("")
    sec = result["seconds"]
    lines.append(f"Wall time: {sec['total'] / 60:.1f} min (adapters {sec['adapters']:.0f} s, vLLM answers "
                 f"{sec['vllm_answers']:.0f} s, perplexity {sec['perplexity']:.0f} s).")
    (out / "control.md").write_text("\n".join(lines) + "\n")


def plot(result: dict, pairs: list[Pair], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = result["references"]
    fig, axes = plt.subplots(2, len(pairs), figsize=(4 * len(pairs), 6.5), squeeze=False)
    for col, p in enumerate(pairs):
        for row, key in enumerate((p.measure, "ppl")):
            ax = axes[row][col]
            ax.axvspan(0, 1, color="0.94")
            for mode, style in zip(MODES, ("o-", "s--")):
                ax.plot(*curve(result, p.name, mode, key), style, label=f"{mode} space", ms=4)
            for ref, color, ls in ((f"system A: {p.name}", "tab:red", ":"), (f"system B: {p.name}", "tab:green", ":"),
                                   ("base", "0.4", "-.")):
                ax.axhline(refs[ref]["mean"][key], color=color, ls=ls, lw=1, label=ref.split(":")[0].replace(
                    "system", "prompt"))
            ax.set_xlabel("w  (0 = A, 1 = B)")
            ax.set_ylabel(key if row == 0 else "perplexity under base")
            if row == 0:
                ax.set_title(f"{p.name}: {p.measure}")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "control.png", dpi=110)


if __name__ == "__main__":
    main()
