"""End to end: a folder in upstream Text-to-LoRA's layout, at the embedded model's shapes, imported with
`vllm-t2l import-t2l`, served by the real server, and checked against the same adapter through peft.

The folder is written here from the layout the upstream fixtures pin down (../shared/fixtures/t2l-upstream):
an L hypernetwork trained on top of a multi-task LoRA (heads without bias, non-zero per-layer AB_offset),
with its heads stored in a training order that adapter_config.json does not list. Its weights are random.
gte-large-en-v1.5 cannot be downloaded here, so the packaged MiniLM (384-d) stands in as the embedder,
run the way upstream runs gte: AutoModel, CLS pooling, a full stop, L2 * sqrt(d).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import peft_logprobs

from vllm_t2l.hypernet import BaseShapes
from vllm_t2l.launch import ServerProcess
from vllm_t2l.models import default_embedder_path, prepare_default_model

pytestmark = pytest.mark.server
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ORDER = ["v_proj", "q_proj"]  # the training order; adapter_config.json lists q_proj first
EMB, LATENT, HEAD_IN, RANK = 384, 16, 32, 8


def upstream_state(shapes: BaseShapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under upstream's keys and shapes, in upstream's key order."""
    g = torch.Generator().manual_seed(seed)
    L, q = shapes.n_layers, LATENT // 4

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(name: str, d_in: int, d_out: int, bias: bool = True, std: float | None = None) -> dict:
        out = {f"{name}.weight": rand(d_out, d_in, std=std or d_in ** -0.5)}
        return {**out, f"{name}.bias": rand(d_out, std=0.02)} if bias else out

    def norm(name: str, d: int) -> dict:
        return {f"{name}.weight": 1 + rand(d, std=0.1), f"{name}.bias": rand(d, std=0.1)}

    s: dict[str, torch.Tensor] = {}
    for m in ORDER:
        d_in, d_out = shapes.modules[m]
        s[f"AB_offset.A.{m}"] = rand(L, RANK, d_in, std=d_in ** -0.5)
        s[f"AB_offset.B.{m}"] = rand(L, d_out, RANK, std=0.01)
    for m in sorted(ORDER):  # sorted by name upstream, and unused in sft
        s[f"mean_recon_target.A.{m}"] = torch.zeros(L, RANK, shapes.modules[m][0])
    s.update(linear("task_encoder.mlp.0", EMB, LATENT // 2))
    s.update(norm("task_encoder.mlp.1", LATENT // 2))
    s["layer_depth_encoder.0.weight"] = rand(L, q, std=1.0)
    s.update(norm("layer_depth_encoder.1", q))
    s["layer_type_encoder.0.weight"] = rand(len(ORDER), q, std=1.0)
    s.update(norm("layer_type_encoder.1", q))
    s.update(linear("mixer.1", LATENT, 4 * LATENT))
    s.update(linear("mixer.4", 4 * LATENT, LATENT))
    for block in ("mlp1.mlp", "mlp2.mlp"):
        s.update(norm(f"{block}.0", LATENT))
        s.update(linear(f"{block}.1", LATENT, 4 * LATENT))
        s.update(linear(f"{block}.4", 4 * LATENT, LATENT))
    s.update(norm("mlp3.0", LATENT))
    s.update(linear("mlp3.1", LATENT, 4 * LATENT))
    s.update(linear("mlp3.4", 4 * LATENT, HEAD_IN))
    for m in ORDER:
        d_in, d_out = shapes.modules[m]
        s.update(linear(f"heads.{m}", HEAD_IN, RANK * (d_in + d_out), bias=False, std=0.002))
    return s


def write_upstream_folder(folder: Path, model_dir: Path) -> Path:
    shapes = BaseShapes.from_config(model_dir, tuple(ORDER))
    folder.mkdir(parents=True)
    torch.save(upstream_state(shapes), folder / "hypermod.pt")
    args = {"model_dir": model_dir.name, "emb_model": "Alibaba-NLP/gte-large-en-v1.5", "encoder_type": "linear",
            "hypernet_latent_size": LATENT, "head_in_size": HEAD_IN, "target_modules": ["q_proj", "v_proj"],
            "shared_AB_head": False, "autoreg_gen": False, "training_task": "sft", "pred_z_score": True,
            "factorized": False, "head_use_bias": False, "mt_lora_path": "mt_lora", "use_one_hot_task_emb": False}
    (folder / "args.yaml").write_text(yaml.safe_dump(args))
    lora = {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "use_rslora": True, "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(lora))
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("t2l-import")
    model_dir = prepare_default_model()
    folder = write_upstream_folder(root / "t2l", model_dir)
    out = subprocess.run([sys.executable, "-m", "vllm_t2l.cli", "import-t2l", str(folder), "--base-config",
                          str(model_dir), "--embedder", str(default_embedder_path()), "--out", str(root / "ckpt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "module order v_proj,q_proj" in out.stdout
    return root, root / "ckpt"


@pytest.fixture(scope="module")
def served(imported):
    root, ckpt = imported
    with ServerProcess(["--checkpoint", str(ckpt), "--cache-dir", str(root / "adapters"), "--max-loras", "2"],
                       root / "server.log") as srv:
        from openai import OpenAI

        yield srv, OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)


def served_logprobs(client, model: str) -> tuple[list[int], list[float]]:
    resp = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=0,
                                          extra_body={"return_tokens_as_token_ids": True})
    content = resp.choices[0].logprobs.content
    return [int(t.token.removeprefix("token_id:")) for t in content], [t.logprob for t in content]


def test_imported_folder_serves_what_peft_computes(imported, served, tmp_path):
    _, ckpt = imported
    server, client = served
    desc = "Answer like a patient math tutor who explains every step"
    answer, logprobs = served_logprobs(client, "t2l:" + desc)
    base_answer, base_logprobs = served_logprobs(client, client.models.list().data[0].id)

    out = tmp_path / "adapter"
    subprocess.run([sys.executable, "-m", "vllm_t2l.cli", "generate", "--checkpoint", str(ckpt), "--description",
                    desc, "--out", str(out)], check=True, capture_output=True, timeout=300)
    ours, without = peft_logprobs(out, QUESTION, answer)
    assert ours == pytest.approx(logprobs, abs=5e-3)
    # the adapter really changes the model, so the match above is not the base model's twice
    assert max(abs(a - b) for a, b in zip(ours, without)) > 0.05, (ours, without)
    assert (answer, logprobs) != (base_answer, base_logprobs)
    assert "checkpoint" in server.log.read_text()
