"""Run every benchmark and write a summary of the project's targets.

    python -m benchmarks [--skip quality,control] [--only cold_miss,throughput] [--quick] [--out DIR]

Each benchmark runs as its own process (`python -m benchmarks.<name>`) and writes its own
`<name>.md`, `.json` and `.png` under the output folder (quality and control: in subfolders); its output goes to
`logs/<name>.log` there. Then `summary.md` and `summary.json` list what ran, how long it took, and the
figures that have a target (docs/benchmarks.md). `--quick` runs every benchmark with small settings, to check the
pipeline (its numbers mean little).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from benchmarks import report
from vllm_t2l.models import MINILM_CHECKPOINT


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, so recorded commands rerun anywhere."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


class Bench(NamedTuple):
    name: str
    quick: list[str] | None  # flags for --quick; None: not run with --quick
    folder: str = "."  # --out folder under the results folder
    long: bool = False  # tens of minutes
    module: str = ""  # another benchmark's module, run with `flags` (empty: benchmarks.<name>)
    flags: tuple[str, ...] = ()


BENCHMARKS = [
    Bench("hypernet_speed", ["--repeats", "5"]),
    Bench("cpu_lora_ops", []),
    Bench("cold_miss", ["--descriptions", "3"]),
    Bench("cold_miss_minilm", ["--descriptions", "3"], "cold-miss-minilm", module="cold_miss",
          flags=("--checkpoint", _shown(MINILM_CHECKPOINT))),
    Bench("cold_miss_strength2", ["--descriptions", "3"], "cold-miss-strength2", module="cold_miss",
          flags=("--strength", "2")),  # the default's recommended strength: its follow network runs too
    Bench("throughput", ["--k", "1,4", "--min-requests", "4", "--rounds", "1", "--max-tokens", "16"]),
    Bench("decode_step", ["--rounds", "1", "--tokens", "16"]),
    Bench("lora_cost", None, long=True),  # six servers
    Bench("scale", ["--n", "40", "--chunk", "20"], long=True),
    Bench("load", ["--requests", "40", "--descriptions", "16", "--concurrency", "8"]),
    Bench("follow", ["--descriptions", "4", "--queries", "1", "--strengths", "1", "--max-tokens", "24"], "follow",
          long=True),
    Bench("control", None, "control", long=True),
    Bench("quality", None, long=True),  # trains its baselines under runs/; writes quality/ itself
]


def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _result(out: Path, b: Bench) -> Path | None:
    """A benchmark's latest JSON result under ``out``, where it writes one (quality: its own subfolder)."""
    module = b.module or b.name
    for path in (out / b.folder / f"{module}.json", out / module / f"{module}.json"):
        if path.exists():
            return path
    return None


def latest(out: Path) -> list[dict]:
    """Every benchmark's latest result present under ``out`` (run now or earlier) with the date and
    command recorded in it, so the summary describes the results folder, not only this invocation."""
    rows = []
    for b in BENCHMARKS:
        path = _result(out, b)
        if path is None:
            rows.append({"name": b.name, "result": "", "date": "", "command": ""})
            continue
        data = json.loads(path.read_text())
        ctx = data.get("context") or data
        rows.append({"name": b.name, "result": str(path.relative_to(out).with_suffix(".md")),
                     "date": str(ctx.get("date", "not recorded")), "command": ctx.get("command", "")})
    return rows


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _bars(out: Path) -> list[tuple[str, str, str, str]]:
    """(bar, measured, verdict, source) for each figure with a target, from the results present."""
    rows = []
    for which, one in (_load(out, "hypernet_speed") or {}).get("embed_forward_ms", {}).items():
        if one.get("descriptions", "short") != "short":  # the bar's "one description"; the table has the rest
            continue
        rows.append((f"embed + hypernetwork ({which}), one description, CPU: p50 <= 15 ms", f"{one['p50']:.1f} ms",
                     verdict(one["p50"] <= 15), "hypernet_speed.md"))
    for folder, which in ((".", "default, static-embedder checkpoint"), ("cold-miss-minilm", "MiniLM checkpoint"),
                          ("cold-miss-strength2", "default at strength 2")):
        if c := _load(out / folder, "cold_miss"):
            r = c["summary_ms"]["ratio_p50"]
            rows.append((f"cold miss ({which}): extra over warm <= 1.2x the filesystem resolver's", f"{r:.2f}x (p50)",
                         verdict(r <= 1.2), f"{folder}/cold_miss.md".removeprefix("./")))
    bars = (_load(out, "throughput") or {}).get("bar") or []
    for b in bars if isinstance(bars, list) else []:  # a dict: an older result, without x plain
        rows.append((f"throughput with {b['k']} t2l: adapters in flight >= {b['min_ratio']:.2f}x plain vLLM (no LoRA)",
                     f"{b['t2l']:.2f}x plain ({b['t2l_vs_base']:.2f}x base; base {b['base']:.2f}x plain, static "
                     f"--lora-modules {b['static']:.2f}x plain)", verdict(b["passed"]), "throughput.md"))
    if s := _load(out, "scale"):
        s = s["summary"]
        rows.append((f"scale: {s['requests']} distinct descriptions, no errors, flat latency, bounded memory",
                     f"{s['errors']} errors, last/first chunk latency {s['last_over_first_chunk_p50']:.2f}x, "
                     f"peak RSS {s['rss_mb']['peak']:.0f} MiB", verdict(s["errors"] == 0), "scale.md"))
        if m := s.get("memory_slope_last_half"):
            rows.append(("scale: memory slope over the last half indistinguishable from zero",
                         f"{m['kib_per_name']:.3f} KiB/name (s.e. {m['stderr_kib_per_name']:.3f})",
                         verdict(m["flat"]), "scale.md"))
    if ld := _load(out, "load"):
        ld = ld["summary"]
        ok = ld["errors"] == 0 and ld["base_answers_differing"] == 0
        rows.append((f"load: {ld['requests']} requests, {ld['concurrency']} at a time: no errors, base = base alone",
                     f"{ld['errors']} errors, {ld['base_answers_differing']} base answers differing", verdict(ok),
                     "load.md"))
    if q := _load(out / "quality", "quality"):
        gap = q["all"]["generated adapter"]["gap_closed"]
        rows.append((f"adapter quality ({Path(q['checkpoint']['path']).name}): >= 50% of the held-out KL gap closed",
                     f"{gap:.1%}", verdict(gap >= 0.5), "quality/quality.md"))
    if c := _load(out / "control", "control"):
        pairs = {k.split("/")[0]: v["bar_met"] for k, v in c["summary"].items() if k.endswith("/weight")}
        rows.append(("control: every opposite pair dials monotonically in weight space (Spearman >= 0.9, ppl <= 1.5x)",
                     f"{sum(pairs.values())} of {len(pairs)} pairs", verdict(all(pairs.values())),
                     "control/control.md"))
    if f := _load(out / "follow", "follow"):
        b, rec = f["bars"], f"{f['recommended']:g}"
        rows += [(f"follow, strength {rec}: moved the asked way on >= 90% of descriptions", f"{b['moved']:.0%}",
                  verdict(b["moved_met"]), "follow/follow.md"),
                 (f"follow, strength {rec}: median shift >= 1.5x the system prompt's",
                  f"{b['shift_ratio']:.2f}x" if math.isfinite(b["shift_ratio"]) else
                  "undefined (the system prompt's median shift is not above 0)", verdict(b["shift_met"]),
                  "follow/follow.md"),
                 (f"follow, strength {rec}: median perplexity <= 1.5x the system prompt's", f"{b['ppl_ratio']:.2f}x",
                  verdict(b["ppl_met"]), "follow/follow.md")]
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = [b.name for b in BENCHMARKS]
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(names)}")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out (e.g. quality,control)")
    parser.add_argument("--skip-long", action="store_true", help="leave out " +
                        ",".join(b.name for b in BENCHMARKS if b.long))
    unquick = ",".join(b.name for b in BENCHMARKS if b.quick is None)
    parser.add_argument("--quick", action="store_true", help="small settings, results in a temporary folder: checks "
                        f"the pipeline only (leaves out {unquick})")
    parser.add_argument("--out", type=Path, help=f"results folder (default: {report.RESULTS})")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    names = [b.name for b in BENCHMARKS]
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="t2l-bench-quick-")) if args.quick else report.RESULTS
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    for n in only + skip:
        if n not in names:
            parser.error(f"unknown benchmark {n!r}; known: {', '.join(names)}")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    runs = []
    chosen = [b for b in BENCHMARKS if (not only or b.name in only) and b.name not in skip
              and not (args.skip_long and b.long) and not (args.quick and b.quick is None)]
    for b in chosen:
        name, module = b.name, b.module or b.name
        if importlib.util.find_spec(f"benchmarks.{module}") is None:
            runs.append({"name": name, "status": "missing", "command": "", "seconds": 0.0})
            continue
        flags = [*b.flags, *(b.quick or [] if args.quick else []), "--out", _shown(args.out / b.folder)]
        cmd = [sys.executable, "-m", f"benchmarks.{module}", *flags]
        print(f"== {name}: {shlex.join(['python', *cmd[1:]])}", flush=True)
        start = time.perf_counter()
        with open(args.out / "logs" / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        status = "ok" if rc == 0 else f"failed (exit {rc}, see logs/{name}.log)"
        print(f"   {status} in {seconds:.0f} s", flush=True)
        runs.append({"name": name, "status": status, "command": shlex.join(["python", *cmd[1:]]), "seconds": seconds})
    bars, results = _bars(args.out), latest(args.out)
    lines = ["# Benchmarks", "",
             f"`python -m benchmarks {shlex.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d %H:%M')})"
             + (", **quick settings: the numbers check the pipeline only**" if args.quick else "") + ".", "",
             "## What ran", "",
             *report.table(["benchmark", "status", "minutes", "command"],
                           [[r["name"], r["status"], f"{r['seconds'] / 60:.1f}", f"`{r['command']}`" if r["command"]
                             else ""] for r in runs]),
             "", "## Latest result of each benchmark", "",
             "Run now or earlier; each file records the command and date that made it.", "",
             *report.table(["benchmark", "result", "date", "command"],
                           [[r["name"], f"[{r['result']}]({r['result']})" if r["result"] else "none yet", r["date"],
                             f"`{r['command']}`" if r["command"] else ""] for r in results]),
             "", "## The bars", "", *report.table(["bar", "measured", "verdict", "details"], bars)]
    path = report.write(args.out, "summary", "\n".join(lines), {"quick": args.quick, "runs": runs, "latest": results,
                                                                "bars": [dict(zip(("bar", "measured", "verdict",
                                                                                   "details"), b)) for b in bars]})
    print(path.read_text())
    if any(r["status"] not in ("ok", "missing") for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
