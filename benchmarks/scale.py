"""Scale: tens of thousands of distinct descriptions, each a cache miss; latency, server memory, errors.

    python -m benchmarks.scale [--n 20000] [--concurrency 4] [--max-tokens 4] [--cache-max-adapters 64]
                               [--grace-s 10] [--max-cpu-loras 32] [--chunk 200] [--minutes M]

Every request names a never-seen description, so every one is a cache miss: the server generates an
adapter, vLLM loads it, and the adapter cache and vLLM's LRUs evict older ones. Records each request's
latency and TTFT, and every ``--sample-every`` requests the resident memory of the server's processes
(API server + engine), the adapter folders on disk and the cache's gauges; reports the slope of memory
against names served over the last half of the run (flat: within two standard errors of zero).

``--control`` then runs what a user would run instead, on a fresh server with the same flags: the same
descriptions, each sent as a system prompt to the base model. Its slope is the server's growth per request
with no adapter involved, and the report gives both slopes and their difference, the cost of serving names.
``--plain`` runs the same system prompts through plain vLLM (no plugin, no LoRA, the same malloc): the growth
that is vLLM's own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.server import (
    base_model_name,
    chat_messages,
    descriptions,
    http_client,
    keep_log,
    plain_server,
    rss_by_process,
    stream_chat,
)
from vllm_t2l.launch import ServerProcess
from vllm_t2l.models import prepare_default_model

QUERY = "Name a colour."
MALLOC_VARS = ("LD_PRELOAD", "MALLOC_ARENA_MAX")


def folders(root: Path) -> int:
    """Adapter folders under ``root``; os.walk skips a folder the cache deletes while it is being counted."""
    return sum("adapter_config.json" in files for _, _, files in os.walk(root))


def sample(server: ServerProcess, i: int, start: float, cache_root: Path, arm: str = "t2l") -> dict:
    by_process = {name: rss / 2**20 for name, rss in rss_by_process(server.pid).items()}
    return {"i": i, "t_s": time.perf_counter() - start, "rss_mb": sum(by_process.values()),
            "rss_mb_by_process": by_process, "folders": folders(cache_root),
            "adapters_resident": 0.0 if arm == "plain" else server.metric("vllm_t2l:adapters_resident")}


async def measure(server: ServerProcess, descs: list[str], cache_root: Path, args,
                  arm: str = "t2l") -> tuple[list[dict], list[dict]]:
    """``args.concurrency`` clients take the next new description as each finishes; a memory sample every
    ``args.sample_every`` finished requests, counted in the order they finish. ``arm``: "t2l" sends each
    description as an adapter (``t2l:<description>``), "system" and "plain" as a system prompt to the base model."""
    base = base_model_name(server) if arm != "t2l" else ""
    rows, samples = [], []
    start = time.perf_counter()
    todo = iter(enumerate(descs))
    stopped = False

    async def client(http) -> None:
        nonlocal stopped
        for i, desc in todo:
            if stopped:
                return
            if arm != "t2l":
                t = await stream_chat(http, base, chat_messages(QUERY, system=desc), args.max_tokens)
            else:
                t = await stream_chat(http, "t2l:" + desc, chat_messages(QUERY), args.max_tokens)
            done = len(rows)
            rows.append({"i": done, "desc": i, "latency_ms": t.latency * 1e3, "ttft_ms": t.ttft * 1e3,
                         "error": t.error})
            stopped = stopped or bool(args.minutes and time.perf_counter() - start > args.minutes * 60)
            if done % args.sample_every == 0 or done == len(descs) - 1 or stopped:
                samples.append(sample(server, done, start, cache_root, arm))
            if (done + 1) % args.chunk == 0:
                chunk = rows[-args.chunk:]
                p50 = report.pct([r["latency_ms"] for r in chunk], 50)
                print(f"[{arm} {done + 1}/{len(descs)}] latency p50 {p50:.0f} ms, RSS {samples[-1]['rss_mb']:.0f}"
                      f" MiB, folders {samples[-1]['folders']},"
                      f" errors {sum(bool(r['error']) for r in chunk)}", flush=True)

    async with http_client(server) as http:
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
    if stopped:
        print(f"stopped after {args.minutes} minutes: {len(rows)} of {len(descs)} names", flush=True)
    return rows, samples


def slope(samples: list[dict], process: str | None = None) -> dict:
    """Least-squares slope of server memory against names served over the last half of the run, with its
    standard error: flat memory means a slope within two standard errors of zero. ``process``: that
    process's memory alone."""
    half = [s for s in samples if s["i"] >= samples[-1]["i"] / 2]
    n = len(half)
    if n < 3:
        return {"samples": n, "kib_per_name": float("nan"), "stderr_kib_per_name": float("nan"), "flat": False}
    xs = [s["i"] for s in half]
    ys = [(s["rss_mb_by_process"].get(process, 0.0) if process else s["rss_mb"]) * 1024 for s in half]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    se = (resid / (n - 2) / sxx) ** 0.5
    return {"samples": n, "from_name": xs[0], "kib_per_name": b, "stderr_kib_per_name": se,
            "flat": abs(b) <= 2 * se}


def summarise(rows: list[dict], samples: list[dict], chunk: int) -> dict:
    chunks = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        rss = [s["rss_mb"] for s in samples if start <= s["i"] < start + chunk]
        chunks.append({"requests": f"{start + 1}-{start + len(part)}",
                       "latency_ms": report.stats([r["latency_ms"] for r in part]),
                       "ttft_ms": report.stats([r["ttft_ms"] for r in part]),
                       "errors": sum(bool(r["error"]) for r in part), "rss_mb_max": max(rss, default=float("nan"))})
    first, last = chunks[0]["latency_ms"]["p50"], chunks[-1]["latency_ms"]["p50"]
    return {"requests": len(rows), "errors": sum(c["errors"] for c in chunks),
            "first_errors": [r["error"] for r in rows if r["error"]][:5],
            "latency_ms": report.stats([r["latency_ms"] for r in rows]),
            "last_over_first_chunk_p50": last / first,
            "rss_mb": {"first_sample": samples[0]["rss_mb"], "end_of_first_chunk": chunks[0]["rss_mb_max"],
                       "peak": max(s["rss_mb"] for s in samples), "last": samples[-1]["rss_mb"]},
            "memory_slope_last_half": slope(samples),
            "memory_slope_last_half_by_process": {name: slope(samples, name)
                                                  for name in samples[-1].get("rss_mb_by_process", {})},
            "folders_max": max(s["folders"] for s in samples),
            "adapters_resident_max": max(s["adapters_resident"] for s in samples), "chunks": chunks}


def allocator(pid: int) -> str:
    """The malloc settings the server process runs with (`vllm-t2l serve` sets them on CPU)."""
    import psutil

    env = psutil.Process(pid).environ()
    return ", ".join(f"{k}={env[k]}" for k in MALLOC_VARS if env.get(k)) or "glibc defaults"


def per_process(slopes: dict) -> str:
    """``name slope (standard error)`` for each process, comma-separated."""
    return ", ".join(f"{name} {one['kib_per_name']:.3f} ({one['stderr_kib_per_name']:.3f})"
                     for name, one in slopes.items())


def within(d: dict) -> str:
    """The two-standard-error verdict on a difference of slopes."""
    return "within two standard errors of zero." if d["flat"] else "**not within two standard errors of zero**."


def markdown(s: dict, ctx: dict, flags: list[str], env: dict[str, str]) -> str:
    rss, m = s["rss_mb"], s["memory_slope_last_half"]
    lines = ["# Scale: distinct descriptions, each a cache miss", "",
             f"`{ctx['command']}` ({ctx['date']}, {ctx['cpus']} CPUs, load average {ctx['load_average_at_end']} "
             f"at the end). Server flags `{' '.join(flags)}`, "
             + ", ".join(f"{k}={v}" for k, v in env.items()) + f". {ctx['concurrency']} clients at once, each sending "
             f"new descriptions one after another: every request is a cache miss. Server malloc: {ctx['allocator']}.",
             "", *report.table(["requests", "latency p50 ms", "latency p95 ms", "TTFT p50 ms", "errors",
                                "server RSS max MiB"],
                               [[c["requests"], c["latency_ms"]["p50"], c["latency_ms"]["p95"], c["ttft_ms"]["p50"],
                                 c["errors"], c["rss_mb_max"]] for c in s["chunks"]]),
             "", f"- {s['requests']} requests of {ctx['planned']} planned, **{s['errors']} errors**; "
                 f"latency p50 of the last chunk / the first: "
                 f"**{s['last_over_first_chunk_p50']:.2f}x**.",
             f"- Server RSS (API server + engine processes): {rss['first_sample']:.0f} MiB after the first request, "
             f"{rss['end_of_first_chunk']:.0f} MiB by the end of the first chunk, peak **{rss['peak']:.0f} MiB**, "
             f"{rss['last']:.0f} MiB at the end.",
             f"- Memory slope over the last half (names {m.get('from_name', 0)}-{s['requests']}, {m['samples']} "
             f"samples): **{m['kib_per_name']:.3f} KiB per name** (standard error {m['stderr_kib_per_name']:.3f}); "
             + ("flat: within two standard errors of zero." if m["flat"] else "**not flat**."),
             *(["- By process: " + per_process(s["memory_slope_last_half_by_process"])
                + " KiB per name (standard error)."] if s.get("memory_slope_last_half_by_process") else []),
             f"- Adapter folders on disk: at most {s['folders_max']} (cache entries plus evicted folders in "
             f"their grace period); adapters resident in the cache: at most {s['adapters_resident_max']:.0f}."]
    if "control" in s:
        c, d = s["control"], s["difference"]
        cm = c["memory_slope_last_half"]
        lines += ["", "## What a user would run instead", "",
                  f"A fresh server with the same flags, the same {c['requests']} descriptions, each sent as a system "
                  f"prompt to the base model (no adapter): **{c['errors']} errors**, RSS peak "
                  f"{c['rss_mb']['peak']:.0f} MiB, last {c['rss_mb']['last']:.0f} MiB.", "",
                  f"- Memory slope over the last half: **{cm['kib_per_name']:.3f} KiB per request** (standard error "
                  f"{cm['stderr_kib_per_name']:.3f}); by process: "
                  f"{per_process(c['memory_slope_last_half_by_process'])}.",
                  f"- Names minus system prompts: **{d['total']['kib_per_name']:.3f} KiB per name** (standard error "
                  f"{d['total']['stderr_kib_per_name']:.3f}): "
                  + within(d["total"]) + f" By process: {per_process(d['by_process'])}."]
    if "plain" in s:
        p, pm = s["plain"], s["plain"]["memory_slope_last_half"]
        lines += ["", "## Plain vLLM", "",
                  f"Plain vLLM (no plugin, no LoRA; malloc: {p['allocator']}), the same {p['requests']} descriptions "
                  f"as system prompts: **{p['errors']} errors**, RSS peak {p['rss_mb']['peak']:.0f} MiB, last "
                  f"{p['rss_mb']['last']:.0f} MiB.", "",
                  f"- Memory slope over the last half: **{pm['kib_per_name']:.3f} KiB per request** (standard error "
                  f"{pm['stderr_kib_per_name']:.3f}); by process: "
                  f"{per_process(p['memory_slope_last_half_by_process'])}.",
                  *(f"- {label} minus plain vLLM: **{d['total']['kib_per_name']:.3f} KiB per request** (standard "
                    f"error {d['total']['stderr_kib_per_name']:.3f}): " + within(d["total"])
                    for label, d in (("Names", s["over_plain"].get("names")),
                                     ("System prompts on this server", s["over_plain"].get("system"))) if d)]
    if s["first_errors"]:
        lines += ["", "First errors:", "", *(f"- {e}" for e in s["first_errors"])]
    return "\n".join(lines)


def plot(rows: list[dict], samples: list[dict], s: dict, chunk: int, path: Path,
         control: list[dict] | None = None, plain: list[dict] | None = None) -> None:
    plt = report.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    top.scatter([r["i"] for r in rows], [r["latency_ms"] for r in rows], s=2, alpha=0.4, label="request")
    mids = [i * chunk + chunk / 2 for i in range(len(s["chunks"]))]
    top.plot(mids, [c["latency_ms"]["p50"] for c in s["chunks"]], "r-o", label=f"p50 per {chunk}")
    top.set_ylabel("latency (ms)")
    top.set_yscale("log")
    top.legend(fontsize=8)
    bottom.plot([x["i"] for x in samples], [x["rss_mb"] for x in samples], label="server RSS, names")
    if control:
        bottom.plot([x["i"] for x in control], [x["rss_mb"] for x in control], "k:",
                    label="server RSS, the same descriptions as system prompts")
    if plain:
        bottom.plot([x["i"] for x in plain], [x["rss_mb"] for x in plain], "m-.",
                    label="plain vLLM RSS, the same descriptions as system prompts")
    bottom.legend(fontsize=8, loc="lower right")
    bottom.set_ylabel("server RSS (MiB)")
    bottom.set_xlabel("request (each a new description)")
    right = bottom.twinx()
    right.plot([x["i"] for x in samples], [x["folders"] for x in samples], "g--", label="adapter folders")
    right.set_ylabel("adapter folders on disk")
    fig.suptitle(f"{s['requests']} distinct descriptions, {s['errors']} errors")
    report.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from running it, so that the docs' commands can be checked against it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="distinct descriptions, one request each")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4,
                        help="clients sending new descriptions at once, each one after another")
    parser.add_argument("--cache-max-adapters", type=int, default=64, help="VLLM_T2L_CACHE_MAX_ADAPTERS")
    parser.add_argument("--grace-s", type=float, default=10.0, help="VLLM_T2L_CACHE_GRACE_S")
    parser.add_argument("--max-cpu-loras", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=200, help="requests per row of the report")
    parser.add_argument("--sample-every", type=int, default=10, help="requests between memory samples")
    parser.add_argument("--minutes", type=float, default=0,
                        help="stop after this many minutes and report the names served so far (0: no limit)")
    parser.add_argument("--control", action="store_true",
                        help="then send the same descriptions as system prompts to the base model on a fresh "
                             "server, and report both slopes and their difference")
    parser.add_argument("--plain", action="store_true",
                        help="then send the same descriptions as system prompts to plain vLLM (no plugin, no LoRA, "
                             "the same malloc), and report its slope and the others' differences from it")
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    parser.add_argument("server_args", nargs="*", help="extra flags for `vllm-t2l serve` (after --)")
    return parser


def run_arm(arm: str, descs: list[str], args, flags: list[str], env: dict[str, str]) -> tuple[list, list, str]:
    """One fresh server, every description sent once as ``arm`` says; returns rows, samples and its malloc."""
    with tempfile.TemporaryDirectory(prefix="t2l-scale-") as tmp:
        cache_root = Path(tmp) / "t2l"
        if arm == "plain":
            server = plain_server(prepare_default_model(), Path(tmp) / "server.log")
            server.env |= same_malloc()
        else:
            server = ServerProcess([*flags, "--cache-dir", str(cache_root)], Path(tmp) / "server.log", env)
        try:
            with server:
                malloc = allocator(server.pid)
                rows, samples = asyncio.run(measure(server, descs, cache_root, args, arm))
        finally:
            keep_log(server, args.out, "scale" if arm == "t2l" else f"scale-{arm}")
    return rows, samples, malloc


def same_malloc() -> dict[str, str]:
    """The malloc settings `vllm-t2l serve` starts vLLM with, for plain vLLM: a slope depends on the allocator."""
    from vllm_t2l.cli import serve_command

    env = serve_command([], None, None, None)[1]
    return {k: env[k] for k in MALLOC_VARS if env.get(k)}


def difference(s: dict, control: dict) -> dict:
    """Names' slope minus the control's, per process too: what serving names adds to the growth without them."""
    def one(a: dict, b: dict) -> dict:
        d, se = a["kib_per_name"] - b["kib_per_name"], (a["stderr_kib_per_name"] ** 2
                                                         + b["stderr_kib_per_name"] ** 2) ** 0.5
        return {"kib_per_name": d, "stderr_kib_per_name": se, "flat": abs(d) <= 2 * se}
    by = control["memory_slope_last_half_by_process"]
    return {"total": one(s["memory_slope_last_half"], control["memory_slope_last_half"]),
            "by_process": {name: one(a, by[name]) for name, a in s["memory_slope_last_half_by_process"].items()
                           if name in by}}


def main() -> None:
    args = build_parser().parse_args()
    descs = descriptions(args.n)
    env = {"VLLM_T2L_CACHE_MAX_ADAPTERS": str(args.cache_max_adapters), "VLLM_T2L_CACHE_GRACE_S": str(args.grace_s)}
    flags = ["--max-cpu-loras", str(args.max_cpu_loras), *args.server_args]
    rows, samples, malloc = run_arm("t2l", descs, args, flags, env)
    s = summarise(rows, samples, args.chunk)
    data = {"samples": samples, "rows": rows}
    if args.control:
        c_rows, c_samples, _ = run_arm("system", descs[:len(rows)], args, flags, env)
        s["control"] = summarise(c_rows, c_samples, args.chunk)
        s["difference"] = difference(s, s["control"])
        data |= {"control_samples": c_samples, "control_rows": c_rows}
    if args.plain:
        p_rows, p_samples, p_malloc = run_arm("plain", descs[:len(rows)], args, flags, env)
        s["plain"] = summarise(p_rows, p_samples, args.chunk) | {"allocator": p_malloc}
        s["over_plain"] = {arm: difference(one, s["plain"]) for arm, one in (("names", s), ("system", s.get("control")))
                           if one}
        data |= {"plain_samples": p_samples, "plain_rows": p_rows}
    ctx = report.context("benchmarks.scale") | {"planned": args.n, "concurrency": args.concurrency,
                                                "allocator": malloc}
    path = report.write(args.out, "scale", markdown(s, ctx, flags, env),
                        {"context": ctx, "server_flags": flags, "env": env, "summary": s, **data})
    plot(rows, samples, s, args.chunk, args.out / "scale.png", data.get("control_samples"), data.get("plain_samples"))
    print(path.read_text())


if __name__ == "__main__":
    main()
