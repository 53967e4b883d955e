"""README.md and docs/*.md stay true to the code: every `vllm-t2l ...` and `python -m benchmarks...` command in
a fenced block is accepted by its argument parser (parsed only, nothing runs), and every relative link points
at a file (and heading) that exists."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
SHELL = {"", "bash", "sh", "shell", "console"}
COMMAND = re.compile(r"(^|[\s;&|])(\S*/)?(vllm-t2l|python3?)\s")
SEPARATORS = {"&&", "||", ";", "|", "&"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _logical_lines(block: str) -> list[tuple[int, str]]:
    """(line offset, text) with backslash continuations joined, shell for-loop variables bound to their first
    value and expanded, so `for steps in 1200 2000; do ... --steps $steps` parses as `--steps 1200`."""
    out, pending, start, bound = [], "", 0, {}
    for i, raw in enumerate(block.splitlines()):
        if not pending:
            start = i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        if m := re.match(r"\s*for (\w+) in (\S+)", line):
            bound[m.group(1)] = m.group(2).rstrip(";")
        for name, value in bound.items():
            line = re.sub(rf"\$(\{{{name}\}}|{name}\b)", value, line)
        out.append((start, line))
    return out


def _shell_lines(doc: Path) -> list[tuple[int, str]]:
    """(line number, command line) of the shell blocks, and in README.md of inline code that starts with a command
    (its results table gives each figure's command inline; elsewhere inline code names subcommands in prose)."""
    text, out = doc.read_text(), []
    for fence in FENCE.finditer(text):
        if fence.group(1) in SHELL:
            first = text[: fence.start(2)].count("\n") + 1
            out += [(first + offset, line) for offset, line in _logical_lines(fence.group(2))]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text) if doc.name == "README.md" else ""
    for span in re.finditer(r"`([^`]+)`", prose):
        if re.match(r"(\S+=\S+ )*(\S*/)?(vllm-t2l|python3?) ", span.group(1)):
            out.append((prose[: span.start()].count("\n") + 1, span.group(1).replace("\n", " ")))
    return out


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every documented command of this project, argv starting at `vllm-t2l` or `-m`."""
    found = []
    for doc in DOCS:
        for number, line in _shell_lines(doc):
            if COMMAND.search(line):
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                tokens, segment = list(lexer), []
                for token in [*tokens, ";"]:
                    if token not in SEPARATORS:
                        segment.append(token)
                        continue
                    while segment and re.match(r"^\w+=", segment[0]):  # VAR=value before the command
                        segment.pop(0)
                    where = f"{doc.relative_to(ROOT)}:{number}"
                    if segment and Path(segment[0]).name == "vllm-t2l":
                        found.append((where, segment))
                    elif (len(segment) > 2 and re.fullmatch(r"python3?", Path(segment[0]).name)
                          and segment[1] == "-m" and segment[2].split(".")[0] == "benchmarks"):
                        found.append((where, segment[1:]))
                    segment = []
    return found


COMMANDS = _commands()


def test_the_docs_show_commands_of_both_kinds():
    kinds = {argv[0] if argv[0] == "-m" else "vllm-t2l" for _, argv in COMMANDS}
    assert kinds == {"-m", "vllm-t2l"} and len(COMMANDS) >= 30, COMMANDS


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w} {' '.join(a[:3])}" for w, a in COMMANDS])
def test_documented_command_parses(where: str, argv: list[str], capsys):
    try:
        if argv[0] == "-m":
            module = argv[1] if argv[1] != "benchmarks" else "benchmarks.__main__"
            importlib.import_module(module).build_parser().parse_args(argv[2:])
            return
        from vllm_t2l import cli

        ns, rest = cli.build_parser().parse_known_args(argv[1:])
        if ns.command != "serve":  # serve hands the flags it does not know to vLLM
            assert not rest, f"{where}: unknown arguments {rest}"
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _links() -> list[tuple[str, Path, str]]:
    """(where, file, target) for every relative link outside code, fenced or inline."""
    out = []
    for doc in DOCS:
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), doc.read_text())
        for n, line in enumerate(text.splitlines(), 1):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if not re.match(r"^[a-z]+:", target):
                    out.append((f"{doc.relative_to(ROOT)}:{n}", doc, target))
    return out


LINKS = _links()


def test_the_docs_link_each_other():
    targets = {(doc.name, t.split("#")[0]) for _, doc, t in LINKS}
    for name in ("serving.md", "training.md", "benchmarks.md", "experiments.md"):
        assert ("README.md", f"docs/{name}") in targets, name


@pytest.mark.parametrize("where,doc,target", LINKS, ids=[f"{w} {t}" for w, _, t in LINKS])
def test_relative_link_resolves(where: str, doc: Path, target: str):
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{where}: {target} points at a missing file"
    if anchor and file.suffix == ".md":
        headings = re.findall(r"^#+\s+(.*)$", FENCE.sub("", file.read_text()), re.M)
        assert anchor in {_slug(h) for h in headings}, f"{where}: no heading #{anchor} in {file.name}"
