"""Shared fixtures. Unit tests use tiny shapes; `server` starts the real vLLM OpenAI server once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_t2l.checkpoint import Checkpoint
from vllm_t2l.embed import EmbedderConfig
from vllm_t2l.hypernet import BaseShapes, HyperConfig, HyperNet
from vllm_t2l.launch import ServerProcess
from vllm_t2l.lora import LoRAWeights
from vllm_t2l.models import DEFAULT_EMBEDDER_NAME, STATIC_EMBEDDER_NAME

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


def rand_lora(seed: int, rank: int = 4, modules=("q_proj", "v_proj"), alpha: float = 8.0,
              use_rslora: bool = True, n_layers: int | None = None) -> LoRAWeights:
    """A random adapter for TINY_CONFIG's shapes."""
    shapes = BaseShapes.from_config(TINY_CONFIG, ("q_proj", "v_proj", "gate_proj", "down_proj"))
    g = torch.Generator().manual_seed(seed)
    L = n_layers or shapes.n_layers
    A = {m: torch.randn(L, rank, shapes.modules[m][0], generator=g) for m in modules}
    B = {m: torch.randn(L, shapes.modules[m][1], rank, generator=g) for m in modules}
    return LoRAWeights(A, B, alpha=alpha, use_rslora=use_rslora)


def recording(handed: list[torch.Tensor]):
    """An allocator for ``tensorfile.empty`` that keeps what it hands out in ``handed``: buffers of NaN
    bytes, so an element the reader leaves unwritten shows."""
    def alloc(nbytes: int) -> torch.Tensor:
        handed.append(torch.full((nbytes,), 255, dtype=torch.uint8))
        return handed[-1]
    return alloc


def make_hypernet(arch: str, shapes: BaseShapes, emb_dim: int = 384, seed: int = 0,
                  randomize: bool = True, follow: bool = False) -> HyperNet:
    """A hypernetwork whose heads are random (not the zero init), so outputs depend on the input."""
    torch.manual_seed(seed)
    net = HyperNet(HyperConfig(arch=arch, emb_dim=emb_dim, latent=32, head_in=48, follow=follow), shapes)
    if randomize:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


@pytest.fixture
def hypernet_factory(tiny_shapes):
    return lambda arch, **kw: make_hypernet(arch, kw.pop("shapes", tiny_shapes), **kw)


def tiny_generator(arch: str, root: Path, embedder, seed: int = 0, follow: bool = False):
    """A Generator for the tiny shapes, through a saved and loaded checkpoint, with the given embedder."""
    from vllm_t2l import checkpoint as ckpt_mod
    from vllm_t2l.generator import Generator

    net = make_hypernet(arch, BaseShapes.from_config(TINY_CONFIG, ("q_proj", "v_proj")), seed=seed, follow=follow)
    return Generator(ckpt_mod.load(Checkpoint(net, embedder.config).save(root / "ckpt")), embedder)


@pytest.fixture(scope="module")
def zgen(tmp_path_factory, minilm):
    """A zhyper-diag generator (the same as tiny_checkpoint's), sharing the session's MiniLM."""
    return tiny_generator("zhyper-diag", tmp_path_factory.mktemp("zhyper"), minilm)


@pytest.fixture(scope="module")
def fgen(tmp_path_factory, minilm):
    """A zhyper-diag generator with a follow network, sharing the session's MiniLM."""
    return tiny_generator("zhyper-diag", tmp_path_factory.mktemp("follow"), minilm, seed=5, follow=True)


@pytest.fixture(scope="module")
def lgen(tmp_path_factory, minilm):
    """A t2l-L generator, sharing the session's MiniLM."""
    return tiny_generator("t2l-L", tmp_path_factory.mktemp("t2lL"), minilm, seed=4)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_shapes) -> Path:
    """A saved zhyper-diag checkpoint for the tiny shapes, with the embedded MiniLM as embedder."""
    net = make_hypernet("zhyper-diag", tiny_shapes)
    return Checkpoint(net, EmbedderConfig(name=DEFAULT_EMBEDDER_NAME, dim=384)).save(tmp_path / "ckpt")


# ---- the real server ------------------------------------------------------------------------

SERVER_CATALOG = {"pirate": "Talk like a pirate in every answer.",
                  "terse": "Answer in as few words as possible."}


class Server(ServerProcess):
    """The test server: `vllm-t2l serve` with a catalog and its own adapter cache."""

    def __init__(self, root: Path):
        self.cache_dir, self.catalog = root / "adapters", root / "catalog.json"
        self.catalog.write_text(json.dumps(SERVER_CATALOG))
        self.catalog_entries = SERVER_CATALOG
        super().__init__(["--catalog", str(self.catalog), "--cache-dir", str(self.cache_dir),
                          "--max-loras", "2", "--max-num-seqs", "32"], root / "server.log",
                         env={"VLLM_T2L_CACHE_MAX_ADAPTERS": "64"})

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, **kw)


def peft_logprobs(adapter: Path, messages: list[dict], answer: list[int]) -> tuple[list[float], list[float]]:
    """Log-probabilities of ``answer``'s tokens under the embedded model with the PEFT folder ``adapter``, and
    without it: the reference any served or exported adapter is checked against."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_t2l.models import prepare_default_model

    model_dir = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter).eval()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)["input_ids"]
    ids = torch.cat([prompt, torch.tensor([answer])], dim=1)

    def scores() -> list[float]:
        logp = torch.log_softmax(model(ids).logits[0, prompt.shape[1] - 1:-1].float(), -1)
        return [logp[i, a].item() for i, a in enumerate(answer)]

    with torch.no_grad():
        with_adapter = scores()
        with model.disable_adapter():
            return with_adapter, scores()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    """`vllm-t2l serve` on the embedded default, started once for the whole session."""
    with Server(tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    """An openai client of the session's real server."""
    return server.client()


@pytest.fixture(scope="module")
def base_model(client) -> str:
    return client.models.list().data[0].id


# ---- unit fixtures (added) ----

@pytest.fixture(scope="session")
def minilm():
    """The embedded all-MiniLM-L6-v2 as the checkpoints' Embedder, loaded once per session (offline)."""
    from vllm_t2l.embed import Embedder
    from vllm_t2l.models import default_embedder_path

    return Embedder(EmbedderConfig(name=DEFAULT_EMBEDDER_NAME, dim=384), str(default_embedder_path()))


@pytest.fixture(scope="session")
def static_minilm():
    """The static embedder distilled from it by `vllm-t2l prepare` (distilled here if setup has not)."""
    from vllm_t2l.embed import Embedder
    from vllm_t2l.models import prepare_static_embedder

    return Embedder(EmbedderConfig(name=STATIC_EMBEDDER_NAME, dim=384), str(prepare_static_embedder()))


@pytest.fixture(scope="session")
def student():
    """The embedded base model with no adapter slots: the teacher of dial samples."""
    from vllm_t2l.models import prepare_default_model
    from vllm_t2l.train.student import Student

    return Student(prepare_default_model(), ())


@pytest.fixture
def one_thread():
    """Run a test's tiny CPU model on one thread: on a shared, busy CPU, torch's thread pool makes a
    MiniLM call ~50x slower (1 s instead of 20 ms) than a single thread does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
