"""Zhyper adapters handed to vLLM as codes: a few hundred numbers per adapter instead of its weights.

Why: a Zhyper adapter is A = diag(z) A_shared and B = B_shared in every layer, and only the codes z
depend on the description. On a cache miss the resolver writes z (kilobytes) beside a PEFT config, and
the worker that loads the folder expands it against the checkpoint's shared basis, written once per
cache; a miss then waits on neither writing nor reading the 1.8 MB of full weights. The folders are
meant for our worker loader (``serving.worker_load``); ``LoRAWeights.save_peft`` writes folders for
everything else.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from torch import Tensor

from vllm_t2l import tensorfile
from vllm_t2l.hypernet import HyperNet, expand_codes
from vllm_t2l.lora import METADATA_FILE, LoRAWeights, write_config

CODES_FILE = "vllm_t2l_codes.safetensors"
BASIS_FILE = "basis.safetensors"

_bases: dict[str, dict[str, Tensor]] = {}  # basis file -> its tensors, read once per process


def save_basis(root: Path, net: HyperNet) -> Path:
    """The checkpoint's shared A and B as ``root/basis.safetensors`` (kept if already there)."""
    path = root / BASIS_FILE
    if not path.exists():
        basis = net.basis()
        stacks = [([f"{m}.A"], a.detach().float()[None]) for m, (a, _) in basis.items()]
        stacks += [([f"{m}.B"], b.detach().float()[None]) for m, (_, b) in basis.items()]
        part = root / f"{BASIS_FILE}.{uuid.uuid4().hex}.part"  # replicas on other hosts may share root
        tensorfile.save(part, stacks, {"format": "pt"})
        os.replace(part, path)
    return path


def save(folder: Path, codes: dict[str, Tensor], basis: Path, base_model: str, alpha: float, use_rslora: bool,
         metadata: dict) -> None:
    """One adapter's folder: codes ``{module: [1, L, r] or [1, L, r, r]}``, its PEFT config, our metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    tensorfile.save(folder / CODES_FILE, [([m], z.detach().float()) for m, z in codes.items()], {"format": "pt"})
    rank = next(iter(codes.values())).shape[2]
    # Relative, so the folder still finds its basis after the cache directory moves.
    write_config(folder, base_model, rank, alpha, use_rslora, list(codes),
                 {**metadata, "basis": os.path.relpath(basis, folder)})


def expand(folder: Path, alpha: float, use_rslora: bool, alloc: tensorfile.Alloc = None) -> LoRAWeights:
    """The adapter a codes folder stands for (as ``Generator.generate`` would have returned it), in
    tensors of its own: vLLM scales B in place when it loads an adapter, so the basis is copied.
    ``alpha`` and ``use_rslora`` are the folder's PEFT config, which the loader has already read;
    ``alloc`` gives the memory of the adapter's tensors (see ``tensorfile.empty``)."""
    basis_file = os.path.normpath(folder / json.loads((folder / METADATA_FILE).read_text())["basis"])
    if basis_file not in _bases:
        _bases[basis_file] = tensorfile.load(basis_file)
    basis = _bases[basis_file]
    codes = tensorfile.load(folder / CODES_FILE)  # as many ranks as the basis has, or the first network's only
    A, B = {}, {}
    for m, z in codes.items():
        shared_A, shared_B = basis[f"{m}.A"], basis[f"{m}.B"][..., :z.shape[-1]]
        A[m] = tensorfile.empty((*z.shape[:2], shared_A.shape[-1]), shared_A.dtype, alloc)
        expand_codes(z[None], shared_A, out=A[m][None])
        B[m] = tensorfile.empty(shared_B.shape, shared_B.dtype, alloc).copy_(shared_B)
    return LoRAWeights(A, B, alpha, use_rslora)
