"""Do adapters do what their descriptions ask? Held-out descriptions with a program-checkable attribute, through
the real server, side by side with the base model, the same text as a system prompt, and the amplified teacher.

    python -m benchmarks.follow [--checkpoint CKPT] [--queries 4] [--strengths 1,2,3] [--recommended 2]

``benchmarks/data/follow.jsonl`` holds the descriptions (none of them a training wording; checked), each with the
attribute that says whether an answer follows it (``MEASURES``) and the direction it should move. Every description
answers the first ``--queries`` held-out queries greedily:
- base: the served base model, no system prompt;
- system prompt: the description as the system prompt;
- teacher: the description's effect amplified, ``l_base + g (l_prompt - l_base)`` at g = ``--guidance``
  (Hugging Face transformers, in-process: vLLM has no such decoding);
- ``t2l[strength=S]:<description>`` for each ``--strengths``.
A shift is the attribute's move from the base answers in the asked direction, divided by the attribute's spread
over all answers of its descriptions (so shifts of different attributes share a scale). Fluency: the answers'
perplexity under the base model given the query and no system prompt, and the share of repeated word trigrams.
Writes follow.md, follow.json and follow.png under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import report
from benchmarks.control import answer_nll, check_unseen, spread
from benchmarks.server import adapter_name
from vllm_t2l import checkpoint
from vllm_t2l.launch import ServerProcess
from vllm_t2l.models import DEFAULT_CHECKPOINT, prepare_default_model
from vllm_t2l.train import checks, data
from vllm_t2l.train.student import Student

DESCRIPTIONS = Path(__file__).parent / "data" / "follow.jsonl"
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*\S", re.MULTILINE)


def _lines(text: str) -> int:
    return sum(bool(line.strip()) for line in text.strip().splitlines())


MEASURES: dict[str, Callable[[str, object], float]] = {
    "words": lambda t, _: checks.word_count(t),
    "upper_share": lambda t, _: checks.upper_share(t),
    "bullets": lambda t, _: float(len(_BULLET.findall(t))),
    "ends_with": lambda t, word: float(checks.check({"type": "ends_with", "text": word}, t)),
    "line_error": lambda t, n: float(abs(_lines(t) - n)),
    "pirate": lambda t, _: checks.pirate(t),
    "formality": lambda t, _: checks.formality(t),
    "sentiment": lambda t, _: checks.sentiment(t),
    "exclamations": lambda t, _: float(t.count("!")),
    "food": lambda t, _: checks.lexicon_balance(t, checks.FOOD_WORDS, frozenset()),
    "sports": lambda t, _: checks.lexicon_balance(t, checks.SPORTS_WORDS, frozenset()),
    "question_end": lambda t, _: float(checks.check({"type": "question_mark_end"}, t)),
}


def repetition(text: str) -> float:
    """Share of word trigrams that repeat an earlier trigram of the same answer (0: none; degenerate loops -> 1)."""
    ws = checks.words(text)
    grams = list(zip(ws, ws[1:], ws[2:]))
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def load_descriptions(path: Path = DESCRIPTIONS) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        if r["measure"] not in MEASURES or r["direction"] not in (1, -1):
            raise ValueError(f"{path}: bad measure or direction in {r}")
    return rows


def served_answers(server: ServerProcess, jobs: list[tuple[str, str | None, str]], max_tokens: int,
                   parallel: int) -> list[str]:
    """Greedy answers for (model, system prompt or None, query) jobs, through the OpenAI API."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=600, max_retries=0)

    def one(job: tuple[str, str | None, str]) -> str:
        model, system, query = job
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return resp.choices[0].message.content or ""

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, jobs))


def summarise(rows: list[dict], conditions: list[str]) -> dict[str, dict]:
    """Per condition: share of descriptions moved the asked way, median shift, median perplexity and repetition."""
    out = {}
    for c in conditions:
        shifts = [r["shift"][c] for r in rows]
        out[c] = {"moved": sum(s > 0 for s in shifts) / len(shifts), "median_shift": statistics.median(shifts),
                  "mean_shift": statistics.fmean(shifts),
                  "median_ppl": statistics.median(r["ppl"][c] for r in rows),
                  "median_repetition": statistics.median(r["repetition"][c] for r in rows)}
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--queries", type=int, default=4, help="held-out queries, spread over the split")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--strengths", default="1,1.5,2,2.5,3", help="comma-separated adapter strengths to serve")
    parser.add_argument("--recommended", type=float,
                        help="the strength the bars are read at (added to --strengths; default: the one the "
                             "checkpoint recommends, or the run's own with --report)")
    parser.add_argument("--guidance", type=float, default=2.0, help="g of the amplified teacher")
    parser.add_argument("--descriptions", type=int, default=0, help="use the first N descriptions (0: all)")
    parser.add_argument("--parallel", type=int, default=16, help="requests in flight")
    parser.add_argument("--out", type=Path, default=report.RESULTS / "follow")
    parser.add_argument("--teacher-from", metavar="JSON", type=Path,
                        help="take the teacher's answers from an earlier follow.json of the same descriptions, "
                             "queries, --max-tokens and --guidance (they do not depend on the checkpoint)")
    parser.add_argument("--report", metavar="JSON", help="only rewrite the table and plot from a follow.json")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.report:  # the bars can be read at any strength the run served
        result = json.loads(Path(args.report).read_text())
        args.recommended = result["recommended"] if args.recommended is None else args.recommended
        if f"strength {args.recommended:g}" not in result["summary"]:
            parser.error(f"--recommended {args.recommended:g} was not served in {args.report}")
        write_report({**result, "recommended": args.recommended}, args.out)
        return
    started = time.time()
    if args.recommended is None:
        args.recommended = checkpoint.load(args.checkpoint).recommended_strength
    descs = load_descriptions()[: args.descriptions or None]
    check_unseen([d["description"] for d in descs])
    queries = spread([q["text"] for q in data.load_queries() if q["split"] != "train"], args.queries)
    strengths = sorted({float(s) for s in args.strengths.split(",")} | {args.recommended})
    teacher = None
    if args.teacher_from:
        try:
            teacher = earlier_teacher(json.loads(args.teacher_from.read_text()), descs, queries, args.max_tokens,
                                      args.guidance)
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--teacher-from {args.teacher_from}: {e}")
    conditions = ["system prompt", "teacher", *[f"strength {s:g}" for s in strengths]]

    args.out.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(["--checkpoint", args.checkpoint], log=args.out / "server.log")
    with server:
        base_model = json.loads(server.get("/v1/models"))["data"][0]["id"]
        jobs = [(base_model, None, q) for q in queries]
        for d in descs:
            jobs += [(base_model, d["description"], q) for q in queries]
            jobs += [(adapter_name(d["description"], s), None, q) for s in strengths for q in queries]
        t0 = time.time()
        texts = served_answers(server, jobs, args.max_tokens, args.parallel)
        t_served = time.time() - t0
    nq, it = len(queries), iter(texts)
    base = [next(it) for _ in queries]
    answers = {}
    for d in descs:
        answers[d["description"]] = {"system prompt": [next(it) for _ in queries]}
        for s in strengths:
            answers[d["description"]][f"strength {s:g}"] = [next(it) for _ in queries]

    t0 = time.time()
    student = Student(prepare_default_model(), ())
    tok = student.tokenizer
    pairs = [(d["description"], q) for d in descs for q in queries] if teacher is None else []
    for d, got in (teacher or {}).items():
        answers[d]["teacher"] = got
    for start in range(0, len(pairs), 32):
        chunk = pairs[start:start + 32]
        outs = student.generate([student.prompt_ids(q, system=d) for d, q in chunk], args.max_tokens,
                                unprompted=[student.prompt_ids(q) for _, q in chunk], guidance=args.guidance)
        for (d, _), ids in zip(chunk, outs):
            answers[d].setdefault("teacher", []).append(tok.decode(ids, skip_special_tokens=True))
    t_teacher = time.time() - t0

    t0 = time.time()
    plain = [student.prompt_ids(q) for q in queries]  # perplexity as the base model reads it: no system prompt
    flat = [(i, a) for i, a in enumerate(base)] + [(i, a) for d in descs for c in conditions
                                                  for i, a in enumerate(answers[d["description"]][c])]
    nll = answer_nll(student, [plain[i] for i, _ in flat], [tok(a, add_special_tokens=False)["input_ids"]
                                                            for _, a in flat])
    t_ppl = time.time() - t0

    def ppl(scores: list[tuple[float, int]]) -> float:
        tokens = sum(n for _, n in scores)
        return math.exp(sum(s for s, _ in scores) / tokens) if tokens else math.nan

    base_ppl = ppl(nll[:nq])
    rows, k, values_of = [], nq, {}
    for d in descs:
        fn, param = MEASURES[d["measure"]], d.get("param")
        got = answers[d["description"]]
        values = {"base": [fn(a, param) for a in base]} | {c: [fn(a, param) for a in got[c]] for c in conditions}
        means = {c: statistics.fmean(v) for c, v in values.items()}
        values_of[d["description"]] = values
        row = {**d, "mean": means,
               "raw_shift": {c: d["direction"] * (means[c] - means["base"]) for c in conditions},
               "ppl": {"base": base_ppl}, "repetition": {}}
        for c in conditions:
            row["ppl"][c] = ppl(nll[k:k + nq])
            row["repetition"][c] = statistics.fmean(repetition(a) for a in got[c])
            k += nq
        row["repetition"]["base"] = statistics.fmean(repetition(a) for a in base)
        rows.append(row)
    spread_of = {}  # one scale per attribute, over every answer of its descriptions
    for m in {r["measure"] for r in rows}:
        values = [v for r in rows if r["measure"] == m
                  for vs in values_of[r["description"]].values() for v in vs]
        spread_of[m] = statistics.pstdev(values) or 1.0
    for r in rows:
        r["shift"] = {c: r["raw_shift"][c] / spread_of[r["measure"]] for c in conditions}

    result = {"checkpoint": args.checkpoint, "queries": queries, "max_tokens": args.max_tokens,
              "guidance": args.guidance, "strengths": strengths, "recommended": args.recommended,
              "conditions": conditions, "spread": spread_of, "base_answers": base, "base_ppl": base_ppl,
              "rows": rows, "answers": answers, "summary": summarise(rows, conditions),
              "seconds": {"served": t_served, "teacher": t_teacher, "perplexity": t_ppl,
                          "total": time.time() - started}, **report.context("benchmarks.follow")}
    write_report(result, args.out)


def earlier_teacher(old: dict, descs: list[dict], queries: list[str], max_tokens: int,
                    guidance: float) -> dict[str, list[str]]:
    """The teacher's answers of an earlier run (its follow.json), which must have asked the same: they do not depend
    on the checkpoint, and making them is most of a run's time."""
    if (old["queries"], old["max_tokens"], old["guidance"]) != (queries, max_tokens, guidance):
        raise ValueError("it was run with other queries, --max-tokens or --guidance")
    missing = [d["description"] for d in descs if d["description"] not in old["answers"]]
    if missing:
        raise ValueError(f"it lacks {len(missing)} of the descriptions, such as {missing[0]!r}")
    return {d["description"]: old["answers"][d["description"]]["teacher"] for d in descs}


def bars(result: dict) -> dict:
    """The three bars at the recommended strength, against the system prompt."""
    s = result["summary"]
    rec, sp = s[f"strength {result['recommended']:g}"], s["system prompt"]
    # a system prompt that moves nothing leaves the ratio undefined, and an undefined ratio meets no bar
    ratio = rec["median_shift"] / sp["median_shift"] if sp["median_shift"] > 0 else math.nan
    ppl_ratio = rec["median_ppl"] / sp["median_ppl"]
    return {"moved": rec["moved"], "moved_met": rec["moved"] >= 0.9, "shift_ratio": ratio,
            "shift_met": ratio >= 1.5, "ppl_ratio": ppl_ratio,
            "ppl_met": ppl_ratio <= 1.5}


def _by_behaviour(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["behaviour"], []).append(r)
    return out


def write_report(result: dict, out: Path) -> None:
    conditions, s, b = result["conditions"], result["summary"], bars(result)
    rec_shift = s[f"strength {result['recommended']:g}"]["median_shift"]
    sp_shift = s["system prompt"]["median_shift"]
    lines = ["# Following the description", "",
             f"`{result['command']}` ({result['date']}; {len(result['rows'])} held-out descriptions x "
             f"{len(result['queries'])} held-out queries, greedy, at most {result['max_tokens']} tokens; "
             f"checkpoint `{result['checkpoint']}`; teacher at g = {result['guidance']:g}).", "",
             "A shift is the attribute's move from the base model's answers, in the direction the description asks, "
             "in units of that attribute's spread over all answers of its descriptions. Perplexity: under the base "
             f"model given the query and no system prompt (base answers: {result['base_ppl']:.2f}). Repetition: "
             "share of repeated word trigrams.", "",
             *report.table(["", "moved the asked way", "median shift", "x system prompt", "mean shift",
                            "median perplexity", "x system prompt", "median repetition"],
                           [[c, f"{v['moved']:.0%}", f"{v['median_shift']:.2f}",
                             f"{v['median_shift'] / s['system prompt']['median_shift']:.2f}"
                             if s["system prompt"]["median_shift"] > 0 else "-",
                             f"{v['mean_shift']:.2f}" if "mean_shift" in v else "-", f"{v['median_ppl']:.2f}",
                             f"{v['median_ppl'] / s['system prompt']['median_ppl']:.2f}",
                             f"{v['median_repetition']:.3f}"] for c, v in s.items()]), "",
             f"At the recommended strength {result['recommended']:g}: moved the asked way on {b['moved']:.0%} "
             f"(bar 90%: {'met' if b['moved_met'] else 'NOT met'}); median shift {rec_shift:.2f} against the system "
             f"prompt's {sp_shift:.2f}, " + (f"{b['shift_ratio']:.2f}x" if math.isfinite(b['shift_ratio']) else
                                             "a ratio that is undefined when the system prompt moves nothing") +
             f" (bar 1.5x: {'met' if b['shift_met'] else 'NOT met'}); median perplexity "
             f"{b['ppl_ratio']:.2f}x the system prompt's (bar <= 1.5x: {'met' if b['ppl_met'] else 'NOT met'}).", "",
             "## Per behaviour (share of its descriptions moved the asked way)", "",
             *report.table(["behaviour", "descriptions", *conditions],
                           [[name, len(rs), *[f"{sum(r['shift'][c] > 0 for r in rs) / len(rs):.0%}"
                                              for c in conditions]]
                            for name, rs in _by_behaviour(result["rows"]).items()]), "",
             "## Per description (attribute means)", "",
             *report.table(["behaviour", "description", "attribute", "base", *conditions],
                           [[r["behaviour"], r["description"], r["measure"] + (f"({r['param']})" if "param" in r
                                                                                 else ""),
                             f"{r['mean']['base']:.2f}", *[f"{r['mean'][c]:.2f}" for c in conditions]]
                            for r in result["rows"]]),
             "", f"Timings (s): {json.dumps({k: round(v) for k, v in result['seconds'].items()})}"]
    report.write(out, "follow", "\n".join(lines), {**result, "bars": b})
    plot(result, out / "follow.png")


def plot(result: dict, path: Path) -> None:
    plt = report.pyplot()
    s, strengths = result["summary"], result["strengths"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [0.0, *strengths]
    ax1.plot(xs, [0.0] + [s[f"strength {x:g}"]["median_shift"] for x in strengths], "o-", label="adapter")
    ax2.plot(xs, [result["base_ppl"]] + [s[f"strength {x:g}"]["median_ppl"] for x in strengths], "o-",
             label="adapter")
    for c, style in (("system prompt", "--"), ("teacher", ":")):
        ax1.axhline(s[c]["median_shift"], ls=style, color="gray" if c == "system prompt" else "black", label=c)
        ax2.axhline(s[c]["median_ppl"], ls=style, color="gray" if c == "system prompt" else "black", label=c)
    ax1.set(xlabel="strength (0: base model)", ylabel="median shift toward the description",
            title=f"{len(result['rows'])} held-out descriptions")
    ax2.set(xlabel="strength (0: base model)", ylabel="median perplexity under the base model", title="fluency")
    ax1.legend()
    ax2.legend()
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
