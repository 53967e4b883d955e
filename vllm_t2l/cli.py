"""`vllm-t2l prepare | serve | generate | init | import-t2l | train | eval`."""

from __future__ import annotations

import argparse
import ctypes.util
import logging
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

log = logging.getLogger("vllm_t2l")

TRUST_HELP = ("let the embedder run the modelling code its folder ships (gte-large-en-v1.5 needs this); "
              "off by default")

# Flags `serve` adds unless the user gives them; later flags win in vLLM's parser.
SERVE_DEFAULTS = [("--enable-lora", None), ("--max-lora-rank", "16"), ("--max-loras", "4"),
                  ("--max-cpu-loras", "32"), ("--host", "127.0.0.1"), ("--max-model-len", "2048")]
CPU_DEFAULTS = [("--dtype", "float32")]
MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")


def _flag_given(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _target_modules(checkpoint: str | None) -> list[str]:
    """The checkpoint's target modules: vLLM then wraps only those layers, not every linear layer,
    which spares the LoRA ops of the untargeted ones (most of the LoRA cost on CPU)."""
    from vllm_t2l.checkpoint import read_config
    from vllm_t2l.models import DEFAULT_CHECKPOINT

    folder = checkpoint or os.environ.get("VLLM_T2L_CHECKPOINT") or DEFAULT_CHECKPOINT
    return list(read_config(folder)[1].target_modules)


STUDIO_PLUGIN = "vllm_t2l_studio"
# Plugin groups VLLM_PLUGINS also filters; vLLM enables its hub resolver only when it is named explicitly.
_FILTERED_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.stat_logger_plugins",
                    "vllm.io_processor_plugins")
_OPT_IN = {"lora_hf_hub_resolver"}


def plugins_allowlist() -> str:
    """VLLM_PLUGINS for `serve`: vLLM loads endpoint plugins (the studio) only when it names them, and a set
    VLLM_PLUGINS also limits every other group, so it lists every plugin that would load without it too."""
    from importlib.metadata import entry_points

    found = {ep.name for group in _FILTERED_GROUPS for ep in entry_points(group=group)} - _OPT_IN
    return ",".join(sorted(found | {"vllm_t2l", STUDIO_PLUGIN}))


def _preload_jemalloc(env: dict[str, str]) -> None:
    """Serve on the system's jemalloc when it has one: as adapters come and go it hands freed memory back,
    so the server holds less and grows more slowly than under glibc's malloc (benchmarks.scale). A malloc
    the user already preloads is kept, and `VLLM_T2L_JEMALLOC=0` turns this off."""
    preload = env.get("LD_PRELOAD", "")
    if env.get("VLLM_T2L_JEMALLOC") == "0" or any(name in preload for name in MALLOCS):
        return
    lib = ctypes.util.find_library("jemalloc")
    if lib:
        env["LD_PRELOAD"] = ":".join(filter(None, [lib, preload]))


def serve_command(vllm_args: list[str], checkpoint: str | None, catalog: str | None,
                  cache_dir: str | None, trust_embedder_code: bool = False) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start vLLM's OpenAI server with the plugin ready."""
    import torch

    from vllm_t2l.models import prepare_default_model

    args = list(vllm_args)
    if not _flag_given(args, "--model") and not (args and not args[0].startswith("-")):
        args = ["--model", str(prepare_default_model())] + args
    on_gpu = torch.cuda.is_available()
    defaults = SERVE_DEFAULTS + ([] if on_gpu else CPU_DEFAULTS)
    extra = [part for flag, value in defaults if not _flag_given(args, flag)
             for part in (flag, value) if part is not None]
    if not _flag_given(args, "--lora-target-modules"):
        extra += ["--lora-target-modules", *_target_modules(checkpoint)]
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    env.setdefault("VLLM_PLUGINS", plugins_allowlist())  # one set by the user is kept as it is
    if not on_gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        _preload_jemalloc(env)
    # Where glibc's malloc serves, its per-thread heaps fragment as adapters come and go; two heaps use
    # about 100 MiB less (benchmarks.scale)
    env.setdefault("MALLOC_ARENA_MAX", "2")
    for key, value in (("CHECKPOINT", checkpoint), ("CATALOG", catalog), ("CACHE_DIR", cache_dir)):
        if value:
            env[f"VLLM_T2L_{key}"] = str(Path(value).resolve())
    if trust_embedder_code:
        env["VLLM_T2L_TRUST_EMBEDDER_CODE"] = "1"
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *extra, *args], env


def cmd_serve(ns: argparse.Namespace, rest: list[str]) -> None:
    argv, env = serve_command(rest, ns.checkpoint, ns.catalog, ns.cache_dir, ns.trust_embedder_code)
    log.info("starting: %s", " ".join(argv))
    os.execve(sys.executable, argv, env)


def cmd_prepare(ns: argparse.Namespace) -> None:
    from vllm_t2l.models import default_embedder_path, prepare_default_model, prepare_static_embedder

    print(f"model:           {prepare_default_model()}")
    print(f"embedder:        {default_embedder_path()}")
    print(f"static embedder: {prepare_static_embedder()}")


def cmd_generate(ns: argparse.Namespace) -> None:
    from vllm_t2l.generator import Generator
    from vllm_t2l.models import DEFAULT_CHECKPOINT
    from vllm_t2l.names import AdapterNameError, load_catalog, spec_from_parts

    try:
        weights = [float(w) for w in ns.weights.split(",")] if ns.weights else None
    except ValueError:
        raise AdapterNameError(f"--weights {ns.weights!r} is not a comma-separated list of numbers") from None
    catalog = load_catalog(ns.catalog) if ns.catalog else None
    spec = spec_from_parts(ns.description, weights, ns.mode, catalog, strength=ns.strength)
    gen = Generator.load(ns.checkpoint or DEFAULT_CHECKPOINT, ns.embedder,
                         trust_embedder_code=ns.trust_embedder_code)
    lora = gen.generate_one(spec)
    base = ns.base_model or gen.checkpoint.base.name
    lora.save_peft(ns.out, base, {"checkpoint": gen.id, "descriptions": spec.descriptions,
                                  "weights": spec.weights, "mode": spec.mode, "strength": spec.strength})
    print(f"wrote {ns.out} (rank {lora.rank}, {len(lora.A)} modules x {lora.n_layers} layers)")


def cmd_init(ns: argparse.Namespace) -> None:
    """An untrained checkpoint for any base model: the starting point of `train`."""
    import torch

    from vllm_t2l.checkpoint import Checkpoint
    from vllm_t2l.embed import EmbedderConfig
    from vllm_t2l.hypernet import BaseShapes, HyperConfig, HyperNet
    from vllm_t2l.models import DEFAULT_EMBEDDER_NAME, default_model_path

    torch.manual_seed(ns.seed)
    base = ns.base_model or str(default_model_path())
    config = HyperConfig(arch=ns.arch, emb_dim=ns.emb_dim, rank=ns.rank, alpha=ns.alpha,
                         target_modules=tuple(ns.target_modules.split(",")),
                         latent=ns.latent, head_in=ns.head_in)
    shapes = BaseShapes.from_config(base, config.target_modules, name=ns.base_name or Path(base).name)
    embedder = EmbedderConfig(name=ns.embedder or DEFAULT_EMBEDDER_NAME, dim=ns.emb_dim,
                              pooling=ns.pooling)
    Checkpoint(HyperNet(config, shapes), embedder, trained=False).save(ns.out)
    print(f"wrote untrained {ns.arch} checkpoint to {ns.out}")


def cmd_import_t2l(ns: argparse.Namespace) -> None:
    from vllm_t2l.t2l_folder import import_t2l

    ckpt = import_t2l(ns.folder, ns.base_config, ns.embedder, ns.module_order)
    ckpt.save(ns.out)
    print(f"imported {ckpt.config.arch} to {ns.out} (id {ckpt.id}; module order "
          f"{','.join(ckpt.config.target_modules)}, from the {ckpt.card['module_order_source']})")


def cmd_train(ns: argparse.Namespace) -> None:
    from vllm_t2l.train.loop import TrainConfig, train

    values = {f.name: getattr(ns, f.name) for f in fields(TrainConfig)
              if f.name != "extra" and getattr(ns, f.name, None) is not None}
    print(f"wrote {train(TrainConfig(**values))}")


def cmd_eval(ns: argparse.Namespace) -> None:
    from vllm_t2l.train.evaluate import EvalConfig, evaluate

    values = {f.name: getattr(ns, f.name) for f in fields(EvalConfig) if getattr(ns, f.name, None) is not None}
    cfg = EvalConfig(**values)
    evaluate(cfg)
    print((Path(cfg.out) / "quality.md").read_text())


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line too (argparse prints the whole usage first)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def _dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per config field, so the CLI never drifts from the dataclass."""
    for f in fields(cls):
        if f.name == "extra":
            continue
        default, flag = f.default, "--" + f.name.replace("_", "-")
        if default is MISSING:
            parser.add_argument(flag, dest=f.name, required=True)
            continue
        if isinstance(default, bool):  # --name / --no-name: type=bool would read "False" as True
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default: {'on' if default else 'off'})")
            continue
        kind = _comma_list if isinstance(default, tuple) else type(default)
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default: {shown!r})")


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand; a problem with the user's input ends it with one line on stderr and exit code 2."""
    try:
        _main(argv)
    except (ValueError, OSError) as e:  # CheckpointError, EmbedderError, AdapterNameError, missing files
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"vllm-t2l: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's flags; `serve` leaves the flags it does not know to vLLM (parse_known_args)."""
    parser = _Parser(prog="vllm-t2l", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start vLLM's OpenAI server with t2l: adapters (other flags go to vLLM)")
    p.add_argument("--checkpoint", help="hypernetwork checkpoint folder (default: the embedded one)")
    p.add_argument("--catalog", help="JSON file {name: description} for t2l:@name")
    p.add_argument("--cache-dir", help="where generated adapters are kept (survives restarts)")
    p.add_argument("--trust-embedder-code", action="store_true", help=TRUST_HELP)

    sub.add_parser("prepare", help="prepare the embedded default model and embedders once and print their paths")

    p = sub.add_parser("generate", help="write a PEFT adapter folder for a description or a mix")
    p.add_argument("--description", action="append", required=True, help="repeat for a mix; @name = catalog")
    p.add_argument("--weights", help="comma-separated weights, one per --description")
    p.add_argument("--mode", choices=("weight", "emb"), default="weight",
                   help="weight: exact sum of updates (default); emb: mix the description embeddings")
    p.add_argument("--strength", type=float, default=1.0,
                   help="scale of the update: 1 mirrors the system prompt, larger follows it more strongly")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--embedder", help="local sentence-transformers folder (default: from the checkpoint)")
    p.add_argument("--catalog")
    p.add_argument("--base-model", help="base_model_name_or_path written into adapter_config.json")
    p.add_argument("--trust-embedder-code", action="store_true", help=TRUST_HELP)

    p = sub.add_parser("init", help="write an untrained checkpoint for a base model")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="zhyper-diag")
    p.add_argument("--base-model", help="model folder or config.json (default: the embedded model)")
    p.add_argument("--base-name", help="identity recorded for the base model")
    p.add_argument("--embedder", help="embedder folder recorded in the checkpoint")
    p.add_argument("--emb-dim", type=int, default=384)
    p.add_argument("--pooling", default="mean")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--head-in", type=int, default=512)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("import-t2l", help="convert a published Text-to-LoRA folder")
    p.add_argument("folder")
    p.add_argument("--base-config", required=True, help="the base model's folder or config.json")
    p.add_argument("--embedder", help="local folder of the checkpoint's embedder (e.g. gte-large-en-v1.5)")
    p.add_argument("--module-order", type=_comma_list,
                   help="training order of the modules, comma-separated (default: the order of the heads in "
                        "hypermod.pt, which is where upstream records it)")
    p.add_argument("--out", required=True)

    from vllm_t2l.train.evaluate import EvalConfig
    from vllm_t2l.train.loop import TrainConfig

    p = sub.add_parser("train", help="train a hypernetwork (modes: align, sft, recon); resumable")
    _dataclass_flags(p, TrainConfig)
    p = sub.add_parser("eval", help="held-out quality of generated adapters vs baselines")
    _dataclass_flags(p, EvalConfig)
    return parser


def _main(argv: list[str] | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    if ns.command == "serve":
        return cmd_serve(ns, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    {"prepare": cmd_prepare, "generate": cmd_generate, "init": cmd_init,
     "import-t2l": cmd_import_t2l, "train": cmd_train,
     "eval": cmd_eval}[ns.command](ns)


if __name__ == "__main__":
    main()
