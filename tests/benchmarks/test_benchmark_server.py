"""Helpers the served benchmarks share: adapter names and adapters written beforehand."""

from __future__ import annotations

import json

import torch

from benchmarks.server import adapter_name, write_adapters
from vllm_t2l.lora import METADATA_FILE, LoRAWeights


def test_adapter_names_carry_the_strength():
    assert adapter_name("Be brief.") == "t2l:Be brief."
    assert adapter_name("Be brief.", 2.5) == "t2l[strength=2.5]:Be brief."


def test_written_adapters_are_served_at_the_strength_asked(tmp_path):
    """The default's update is its first network's plus (S - 1) times its follow network's, so the
    adapters written at strengths 1, 2 and 3 are evenly spaced, and only strength 1 leaves the follow out."""
    names = {f"s{s}": s for s in (1, 2, 3)}
    folders = {name: write_adapters({name: "Answer like a pirate."}, tmp_path, "base", strength=s)[name]
               for name, s in names.items()}
    loras = {name: LoRAWeights.load_peft(folder) for name, folder in folders.items()}
    assert json.loads((folders["s2"] / METADATA_FILE).read_text())["strength"] == 2.0
    assert loras["s1"].rank < loras["s2"].rank == loras["s3"].rank
    d1, d2, d3 = (loras[n].delta("v_proj", 5) for n in ("s1", "s2", "s3"))
    assert not torch.allclose(d1, d2)
    torch.testing.assert_close(d3 - d2, d2 - d1, atol=1e-6, rtol=1e-4)
