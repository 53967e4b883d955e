"""`vllm-t2l train`: fit a hypernetwork (or a plain LoRA baseline) with one of three objectives.

- align: context distillation; the generated adapter must reproduce the description-as-system-prompt
         (with --dials, rule-made targets for four dials beside it: train/dials.py).
- sft:   (description, input, output) examples, response-only cross-entropy (as Text-to-LoRA).
- recon: match a library of existing PEFT adapters, each with its description.

Resumable: ``<out>/state.pt`` holds weights, optimizer, step and RNG state, written atomically every
``save_every`` steps; ``<out>/checkpoint`` is a servable checkpoint; ``<out>/log.jsonl`` the log.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vllm_t2l.checkpoint import Checkpoint, CheckpointError, load
from vllm_t2l.embed import Embedder
from vllm_t2l.hypernet import BaseShapes, HyperConfig, HyperNet, LoRABatch
from vllm_t2l.lora import METADATA_FILE, LoRAWeights
from vllm_t2l.train import data, dials, objectives, teacher
from vllm_t2l.train.student import Student


@dataclass
class TrainConfig:
    mode: str = "align"  # align | sft | recon
    arch: str = "zhyper-diag"  # a hypernetwork arch, or "lora" for a description-blind LoRA
    out: str = "runs/default"
    base_model: str = ""  # empty: the embedded default
    embedder: str = ""  # empty: the embedded MiniLM
    embedder_name: str = ""  # identity recorded in the checkpoint (default: the MiniLM's name)
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 30
    rank: int = 8
    alpha: float = 16.0
    latent: int = 128
    head_in: int = 256
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    per_prompt: int = 12  # teacher answers per training prompt
    composites: int = 0  # align: this many more behaviours, two training descriptions together (one answer each)
    dials: int = 0  # align: this many rule-made examples per pole of data/dials.jsonl (train/dials.py)
    ruled_weight: float = 1.0  # align: loss weight of a dial answer's rule-written tokens (dials.token_weights)
    pole_weights: tuple[str, ...] = ()  # align: per-pole overrides of ruled_weight, e.g. dial-short=32
    anchor_weight: float = 0.0  # align with --init: pull adapters of non-dial texts back to --init's (_anchors)
    guidance: float = 2.0  # align: g of the guided teacher, l_base + g (l_prompt - l_base) (objectives.guided_logp)
    guided_share: float = 0.0  # align: share of rows taught at strength `guidance` against the guided teacher
    max_new_tokens: int = 32
    top_k: int = 16
    prompt_ids: tuple[str, ...] = ()  # restrict training to these prompts (oracle adapters)
    adapters: str = ""  # recon: folder of PEFT adapter folders
    init: str = ""  # start from this checkpoint's weights (same architecture and base shapes)
    follow: str = ""  # align, zhyper-diag: train only a follow network beside --init's (kept as it is); "new" or a
    # checkpoint of --init's architecture to start it from (hypernet.py, ``follow``)
    save_every: int = 50
    seed: int = 0
    threads: int = 0  # 0: torch default
    extra: dict = field(default_factory=dict)


class FreeLoRA(nn.Module):
    """One LoRA shared by every row: the description-blind multi-task baseline and the oracles."""

    def __init__(self, config: HyperConfig, shapes: BaseShapes):
        super().__init__()
        self.config, self.shapes = config, shapes
        L, r = shapes.n_layers, config.rank
        self.A = nn.ParameterDict({m: nn.Parameter(torch.empty(L, r, i)) for m, (i, _) in shapes.modules.items()})
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros(L, o, r)) for m, (_, o) in shapes.modules.items()})
        for a in self.A.values():
            for layer in a:
                nn.init.kaiming_uniform_(layer, a=math.sqrt(5))

    def forward(self, emb: Tensor) -> LoRABatch:
        n = emb.shape[0]
        return {m: (self.A[m].expand(n, *self.A[m].shape), self.B[m].expand(n, *self.B[m].shape)) for m in self.A}

    def weights(self) -> LoRAWeights:
        return LoRAWeights({m: a.detach().clone() for m, a in self.A.items()},
                           {m: b.detach().clone() for m, b in self.B.items()},
                           self.config.alpha, self.config.use_rslora)


def _examples(cfg: TrainConfig, student: Student, base_dir: Path, out: Path) -> list[teacher.Sample]:
    """Training examples for the mode, cached under ``out`` (teacher answers are the slow part)."""
    if cfg.mode == "align":
        # Named prompts (oracles) may be held-out ones: trained on their canonical wording only.
        prompts = [p for p in data.load_prompts()
                   if (p["id"] in cfg.prompt_ids if cfg.prompt_ids else p["split"] == "train")]
        queries = [q for q in data.load_queries() if q["split"] == "train"]
        samples = _cached(out / "teacher-train.pt", lambda: teacher.build(
            student, base_dir, teacher.pairs(prompts, queries, cfg.per_prompt, cfg.seed,
                                             all_descriptions=not cfg.prompt_ids), cfg.max_new_tokens, cfg.top_k))
        if cfg.composites:
            samples += _cached(out / "teacher-composites.pt", lambda: teacher.build(
                student, base_dir, teacher.pairs(data.composites(prompts, cfg.composites, cfg.seed), queries, 1,
                                                 cfg.seed), cfg.max_new_tokens, cfg.top_k))
        if cfg.dials:
            ruled = _cached(out / "dials.pt", lambda: dials.build(
                student, base_dir, dials.pairs(data.load_dials(), queries, cfg.dials, cfg.seed), cfg.max_new_tokens,
                cfg.seed, cfg.top_k))
            if any(not s.top_ids.numel() for s in ruled):
                raise ValueError(f"{out / 'dials.pt'} holds dial samples without teacher rows, from an older "
                                 "vllm-t2l (commit 2eaa031 or before); delete it to rebuild them")
            samples += ruled
        return samples
    if cfg.mode == "sft":
        eos = student.tokenizer.eos_token_id
        out_samples = []
        for task in data.load_tasks():
            if task["split"] != "train":
                continue
            for j, ex in enumerate(task["examples"]):
                response = student.tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + [eos]
                desc = task["descriptions"][j % len(task["descriptions"])]
                out_samples.append(teacher.Sample(task["task"], desc, ex["input"],
                                                  student.prompt_ids(ex["input"]), response,
                                                  torch.zeros(0), torch.zeros(0)))
        return out_samples
    raise ValueError(f"unknown mode {cfg.mode!r}")


def _cached(cache: Path, make: Callable[[], list[teacher.Sample]]) -> list[teacher.Sample]:
    """Samples from ``cache``, or made and cached (teacher answers are the slow part of training)."""
    if cache.exists():
        return teacher.load(cache)
    samples = make()
    teacher.save(samples, cache)
    return samples


def _recon_library(folder: Path) -> list[tuple[str, LoRAWeights]]:
    items = []
    for sub in sorted(p for p in folder.iterdir() if (p / "adapter_config.json").exists()):
        meta_file = sub / METADATA_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        desc_file = sub / "description.txt"
        desc = desc_file.read_text().strip() if desc_file.exists() else " ".join(meta.get("descriptions", []))
        if not desc:
            raise ValueError(f"{sub} has no description.txt and no descriptions in {METADATA_FILE}")
        items.append((desc, LoRAWeights.load_peft(sub)))
    if not items:
        raise ValueError(f"{folder} holds no PEFT adapter folders")
    return items


def train(cfg: TrainConfig) -> Path:
    """Runs (or resumes) training; returns the servable checkpoint folder."""
    from vllm_t2l.models import DEFAULT_EMBEDDER_NAME, default_embedder_path, prepare_default_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    poles = data.load_dials()
    by_pole = dials.pole_weights(tuple(cfg.pole_weights), poles)  # a typo fails before any work
    if cfg.guided_share and (cfg.mode != "align" or not 0 < cfg.guided_share <= 1 or cfg.guidance <= 0):
        raise ValueError("--guided-share (in (0, 1]) and a positive --guidance need align mode")
    if cfg.anchor_weight and (cfg.mode != "align" or not cfg.init):
        raise ValueError("--anchor-weight keeps adapters near the --init checkpoint's: it needs --init and align mode")
    if cfg.follow and (cfg.arch != "zhyper-diag" or not cfg.init or not cfg.guided_share):
        raise ValueError("--follow trains a strength-only network beside --init's: it needs --arch zhyper-diag, "
                         "--init and --guided-share (rows at strength 1 do not reach it)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    base_dir = Path(cfg.base_model) if cfg.base_model else prepare_default_model()
    embedder_path = cfg.embedder or str(default_embedder_path())
    embedder = Embedder.describe(embedder_path, cfg.embedder_name or cfg.embedder or DEFAULT_EMBEDDER_NAME)
    emb_cfg = embedder.config

    hyper_arch = "t2l-L" if cfg.arch == "lora" else cfg.arch
    hcfg = HyperConfig(arch=hyper_arch, emb_dim=emb_cfg.dim, latent=cfg.latent, head_in=cfg.head_in,
                       rank=cfg.rank, alpha=cfg.alpha, target_modules=tuple(cfg.target_modules),
                       follow=bool(cfg.follow))
    shapes = BaseShapes.from_config(base_dir, hcfg.target_modules, name=base_dir.name)
    model: nn.Module = FreeLoRA(hcfg, shapes) if cfg.arch == "lora" else HyperNet(hcfg, shapes)
    state_path = out / "state.pt"
    resumed = state_path.exists()
    # Before the teacher's answers, so a bad --init fails in seconds; read once, also for the anchor.
    start = _start_state(model, cfg) if cfg.init and (cfg.anchor_weight or not resumed) else None
    if start is not None and not resumed:
        model.load_state_dict(start)
    if cfg.follow:  # the first network stays exactly --init's: strength 1 is unchanged
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("follow."))
    reference = None
    if cfg.anchor_weight:
        reference = HyperNet(hcfg, shapes)
        reference.load_state_dict(start)
        reference.eval().requires_grad_(False)
    anchor_strength = cfg.guidance if cfg.follow else 1.0  # at strength 1 a follow network adds nothing
    student = Student(base_dir, hcfg.target_modules) if cfg.mode != "recon" else None

    if cfg.mode == "recon":
        library = _recon_library(Path(cfg.adapters))
        texts = [d for d, _ in library]
    else:
        samples = _examples(cfg, student, base_dir, out)
        texts = sorted({s.description for s in samples})
    anchors = _anchors(samples, poles) if reference is not None else []
    table = dict(zip(texts + anchors, embedder(texts + anchors)))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(
        0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps))))))
    step = 0
    if resumed:
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_tuple(state["py_rng"]))

    n_items = len(library) if cfg.mode == "recon" else len(samples)
    log = open(out / "log.jsonl", "a")
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.mode}/{cfg.arch}", unit="step")
    while step < cfg.steps:
        t0 = time.perf_counter()
        idx = random.sample(range(n_items), min(cfg.batch_size, n_items))
        if cfg.mode == "recon":
            emb = torch.stack([table[library[i][0]] for i in idx])
            pred = model(emb)
            target = {m: (torch.stack([library[i][1].A[m] for i in idx]),
                          torch.stack([library[i][1].B[m] for i in idx])) for m in pred}
            loss = objectives.reconstruction(pred, target)
        else:
            chunk = [samples[i] for i in idx]
            emb = torch.stack([table[s.description] for s in chunk])
            batch = student.make_batch([s.student_prompt for s in chunk], [s.response for s in chunk])
            strength = _strengths(cfg, len(chunk))
            top_ids, top_logp = torch.cat([s.top_ids for s in chunk]), torch.cat([s.top_logp for s in chunk])
            if cfg.mode == "align" and bool((strength != 1).any()):
                top_logp = _guided_targets(student, batch, top_ids, top_logp, strength, cfg.guidance)
            if hcfg.follow:
                student.set_adapters(_at_strength(model, emb, strength), hcfg.scaling)
            else:
                student.set_adapters(model(emb), hcfg.scaling * strength)
            logits = student.logits(batch)
            if cfg.mode == "align":
                per_token = objectives.distill_kl(logits, top_ids, top_logp)
                ruled = torch.cat([torch.full((len(s.response),), by_pole.get(s.prompt_id, cfg.ruled_weight))
                                   for s in chunk])
                weight = dials.token_weights(top_logp, ruled)
                loss = (per_token * weight).sum() / weight.sum()
                if reference is not None:
                    held = random.sample(anchors, min(cfg.batch_size, len(anchors)))
                    emb = torch.stack([table[t] for t in held])
                    with torch.no_grad():
                        kept = _at_strength(reference, emb, anchor_strength)
                    drift = objectives.adapter_drift(_at_strength(model, emb, anchor_strength), kept).mean()
                    loss = loss + cfg.anchor_weight * drift
            else:
                loss = objectives.cross_entropy(logits, batch.targets, label_smoothing=0.1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.write(json.dumps({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                              "seconds": round(time.perf_counter() - t0, 3),
                              **({"drift": drift.item()} if reference is not None else {})}) + "\n")
        log.flush()
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save_state(state_path, model, opt, sched, step)
    bar.close()
    if student is not None:
        student.set_adapters(None)
    model.eval()
    if isinstance(model, FreeLoRA):
        return model.weights().save_peft(out / "adapter", base_dir.name, {"trained": cfg.mode, "steps": step})
    card = {"mode": cfg.mode, "steps": step, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "examples": n_items, "descriptions": len(texts),
            "recommended_strength": cfg.guidance if cfg.guided_share else 1.0}
    ckpt = Checkpoint(model, emb_cfg, trained=True, card=card)
    return ckpt.save(out / "checkpoint")


def _strengths(cfg: TrainConfig, n: int) -> Tensor:
    """Per row, the strength its adapter is trained at: ``guidance`` for a ``guided_share`` of rows, else 1.

    A row at strength g has its update scaled by g and is taught the guided teacher of the same g, so that the served
    strength S (a scale of the update, ``names``) means "follow the description as guidance S would", while strength
    1 stays the plain alignment prompt.
    """
    if not cfg.guided_share:  # draws nothing, so runs without guidance keep their random streams
        return torch.ones(n)
    return torch.where(torch.rand(n) < cfg.guided_share, cfg.guidance, 1.0)


@torch.no_grad()
def _guided_targets(student: Student, batch, top_ids: Tensor, top_logp: Tensor, strength: Tensor,
                    guidance: float) -> Tensor:
    """``top_logp`` with the rows of guided samples replaced by the guided teacher's; the no-prompt model is the
    student without adapters. Rule-made (one-hot) rows are already all the way to their target and stay."""
    student.set_adapters(None)
    base = torch.log_softmax(student.logits(batch), -1).gather(-1, top_ids.long())
    rows = (strength[batch.rows] != 1) & (top_logp[:, 1] != dials.RULED_LOGP)
    guided = objectives.guided_logp(top_logp, base, guidance).to(top_logp.dtype)
    return torch.where(rows[:, None], guided, top_logp)


def _anchors(samples: list[teacher.Sample], poles: list[dict]) -> list[str]:
    """Texts whose adapters the anchor loss holds in place: every non-dial training description (composites too)
    and the training queries, the latter standing in for text unlike any description.

    Dial poles are trained to extremes; without an anchor the whole map drifts with them, and descriptions far from
    every training one (the held-out manifestos) get large adapters they never asked for.
    """
    dial_ids = {p["id"] for p in poles}
    described = {s.description for s in samples if s.prompt_id not in dial_ids}
    return sorted(described | {q["text"] for q in data.load_queries() if q["split"] == "train"})


def _at_strength(net: nn.Module, emb: Tensor, strength: Tensor | float) -> LoRABatch:
    """The adapters served at ``strength`` (one per row, or one for all): for Zhyper, scaled in code space."""
    if isinstance(net, HyperNet) and net.config.arch.startswith("zhyper"):
        return net.from_codes(net.at_strength(net.codes(emb), strength))
    if not isinstance(strength, Tensor) and strength == 1:
        return net(emb)
    raise ValueError("only Zhyper adapters are trained at a strength other than 1 through their codes")


def _start_state(model: nn.Module, cfg: TrainConfig) -> dict[str, Tensor]:
    """The state training starts from: --init's weights, and with --follow a follow network beside them
    (``new``: as initialised, B zero, so the start is --init's adapters at every strength)."""
    init = _load_init(model, Path(cfg.init)).hypernet.state_dict()
    if not cfg.follow:
        return init
    follow = (model.follow.state_dict() if cfg.follow == "new"
              else _load_init(model, Path(cfg.follow)).hypernet.state_dict())
    return {**init, **{f"follow.{k}": v for k, v in follow.items()}}


def _load_init(model: nn.Module, folder: Path) -> Checkpoint:
    """Fine-tune rather than start over: the checkpoint must describe the same network (a follow
    network's parts are each a network of the checkpoint's kind)."""
    if not isinstance(model, HyperNet):
        raise ValueError("--init needs a hypernetwork arch, not a plain LoRA")
    init = load(folder)
    init.check_base(model.shapes)
    want = replace(model.config, follow=False)
    if init.config != want:
        raise CheckpointError(f"{folder} is a {init.config.arch} checkpoint that differs from the network being "
                              f"trained: {init.config} against {want}")
    return init


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def _save_state(path: Path, model: nn.Module, opt, sched, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "step": step, "torch_rng": torch.get_rng_state(),
                "py_rng": list(random.getstate())}, tmp)
    tmp.replace(path)
