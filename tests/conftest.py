"""Shared fixtures. Unit tests use tiny shapes; `server` starts the real vLLM OpenAI server once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_t2l.checkpoint import Checkpoint
from vllm_t2l.embed import EmbedderConfig
from vllm_t2l.hypernet import BaseShapes, HyperConfig, HyperNet
from vllm_t2l.models import DEFAULT_EMBEDDER_NAME

TINY_CONFIG = {  # a Llama-style config.json small enough for fast tests
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
    "num_hidden_layers": 3, "vocab_size": 128, "_name_or_path": "tiny-llama",
}


@pytest.fixture
def tiny_config_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return tmp_path


@pytest.fixture
def tiny_shapes() -> BaseShapes:
    return BaseShapes.from_config(TINY_CONFIG, ("q_proj", "v_proj"))


def make_hypernet(arch: str, shapes: BaseShapes, emb_dim: int = 384, seed: int = 0,
                  randomize: bool = True) -> HyperNet:
    """A hypernetwork whose heads are random (not the zero init), so outputs depend on the input."""
    torch.manual_seed(seed)
    net = HyperNet(HyperConfig(arch=arch, emb_dim=emb_dim, latent=32, head_in=48), shapes)
    if randomize:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


@pytest.fixture
def hypernet_factory(tiny_shapes):
    return lambda arch, **kw: make_hypernet(arch, kw.pop("shapes", tiny_shapes), **kw)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_shapes) -> Path:
    """A saved zhyper-diag checkpoint for the tiny shapes, with the embedded MiniLM as embedder."""
    net = make_hypernet("zhyper-diag", tiny_shapes)
    return Checkpoint(net, EmbedderConfig(name=DEFAULT_EMBEDDER_NAME, dim=384)).save(tmp_path / "ckpt")


# ---- the real server ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, log: Path, cache_dir: Path, catalog: Path):
        self.port, self.log, self.cache_dir, self.catalog = port, log, cache_dir, catalog
        self.base_url = f"http://127.0.0.1:{port}"
        self.catalog_entries = SERVER_CATALOG

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, **kw)

    def metric(self, name: str) -> float:
        import urllib.request

        text = urllib.request.urlopen(self.base_url + "/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


SERVER_CATALOG = {"pirate": "Talk like a pirate in every answer.",
                  "terse": "Answer in as few words as possible."}


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    """`vllm-t2l serve` on the embedded default, started once for the whole session."""
    root = tmp_path_factory.mktemp("server")
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps(SERVER_CATALOG))
    srv = Server(_free_port(), root / "server.log", root / "adapters", catalog)
    cmd = [sys.executable, "-m", "vllm_t2l.cli", "serve", "--port", str(srv.port),
           "--catalog", str(catalog), "--cache-dir", str(srv.cache_dir),
           "--max-loras", "2", "--max-num-seqs", "32"]
    env = dict(os.environ, VLLM_T2L_CACHE_MAX_ADAPTERS="64")
    with open(srv.log, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    import urllib.request

    deadline = time.time() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{srv.log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(srv.base_url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"server did not start:\n{srv.log.read_text()[-4000:]}") from None
                time.sleep(2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- unit fixtures (added) ----

@pytest.fixture(scope="session")
def minilm():
    """The embedded all-MiniLM-L6-v2 as the checkpoints' Embedder, loaded once per session (offline)."""
    from vllm_t2l.embed import Embedder
    from vllm_t2l.models import default_embedder_path

    return Embedder(EmbedderConfig(name=DEFAULT_EMBEDDER_NAME, dim=384), str(default_embedder_path()))


@pytest.fixture
def one_thread():
    """Run a test's tiny CPU model on one thread: on a shared, busy CPU, torch's thread pool makes a
    MiniLM call ~50x slower (1 s instead of 20 ms) than a single thread does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
