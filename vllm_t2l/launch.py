"""`vllm-t2l serve` as a child process: start it, wait until it answers, read /metrics, stop it.

The tests and the benchmarks use this to talk to the real server over HTTP. The server runs in its own
process group, so ``stop()`` also ends vLLM's engine processes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

_SAMPLE = re.compile(r"^([^\s{]+)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) for each sample of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            samples.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return samples


class ServerProcess:
    """``vllm-t2l serve --port <free port> *args`` with ``env`` added to this process's environment.

    ``command`` replaces ``vllm-t2l serve`` (the benchmarks start plain vLLM with it, for comparison).
    """

    def __init__(self, args: Sequence[str] = (), log: str | Path = "server.log",
                 env: Mapping[str, str] | None = None, port: int | None = None,
                 command: Sequence[str] | None = None):
        self.command = list(command or [sys.executable, "-m", "vllm_t2l.cli", "serve"])
        self.port = port or free_port()
        self.args = ["--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.log = Path(log)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 1800) -> ServerProcess:
        """Start the server and return once /health answers; raise with the log's tail if it does not."""
        cmd = [*self.command, *self.args]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(self.base_url + "/health", timeout=2)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server did not start:\n{self.log.read_text()[-4000:]}") from None
                time.sleep(1)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after ``timeout``."""
        if self.proc is None:
            return
        group = self.proc.pid  # start_new_session: the server leads its own group
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # engine processes exit after the API server
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def get(self, path: str, timeout: float = 10) -> str:
        return urllib.request.urlopen(self.base_url + path, timeout=timeout).read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The first /metrics sample called ``name`` whose labels include ``labels``."""
        for sample, have, value in parse_metrics(self.get("/metrics")):
            if sample == name and labels.items() <= have.items():
                return value
        raise KeyError(name if not labels else f"{name}{labels}")
