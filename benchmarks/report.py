"""Writing benchmark results: a Markdown report, the same numbers as JSON, and matplotlib figures."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def pct(values: Iterable[float], q: float) -> float:
    """The q-th percentile (linear interpolation) of the finite values; NaN when there are none."""
    v = sorted(x for x in values if math.isfinite(x))
    if not v:
        return math.nan
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def stats(values: Sequence[float]) -> dict[str, float]:
    """p50, p95 and count of a list of measurements (NaN entries are failures and are not counted)."""
    return {"p50": pct(values, 50), "p95": pct(values, 95), "n": sum(math.isfinite(x) for x in values)}


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table; floats get one decimal."""
    def cell(x: object) -> str:
        return f"{x:.1f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return lines


def context(module: str) -> dict[str, object]:
    """The command that reproduces a result (``module`` with this process's arguments), and where it ran."""
    return {"command": shlex.join(["python", "-m", module, *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average_at_end": round(os.getloadavg()[0], 2)}


def write(out: Path, name: str, markdown: str, data: dict) -> Path:
    """Write ``<out>/<name>.md`` and ``<out>/<name>.json``; return the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    path = out / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    return path


def pyplot():
    """matplotlib's pyplot without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write as PNG and close (benchmarks make many figures in one process)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
