"""`vllm-t2l eval`: how well generated adapters reproduce held-out descriptions, side by side.

On held-out descriptions (held-out prompts and whole held-out families) and held-out queries:
- mean per-token KL(teacher || model) for: the base model without the prompt; a description-blind
  multi-task LoRA; the generated adapter; a per-prompt oracle LoRA; the prompt in context (0);
- compliance with the program-checkable prompts, for the same five (``--no-compliance`` skips the vLLM
  answers it needs: KL only, a few minutes instead of tens);
- context tokens saved per request versus sending the description as the system prompt;
- the share of the gap closed per prompt family, to see which behaviours a training recipe wins or loses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_t2l.generator import Generator
from vllm_t2l.lora import LoRAWeights
from vllm_t2l.names import spec_from_parts
from vllm_t2l.train import checks, data, objectives, teacher
from vllm_t2l.train.student import Student


@dataclass
class EvalConfig:
    checkpoint: str
    out: str = "benchmarks/results/quality"
    work: str = "runs/eval"  # scratch: held-out teacher answers, generated adapter folders
    multitask: str = ""  # PEFT folder of the description-blind LoRA
    oracles: str = ""  # folder of per-prompt PEFT folders, named by prompt id
    compare: tuple[str, ...] = ()  # more hypernetwork checkpoints, reported beside the main one
    queries_per_prompt: int = 6
    max_new_tokens: int = 32
    top_k: int = 16
    batch_size: int = 16
    seed: int = 1
    compliance: bool = True  # off: KL only, in minutes; compliance needs every setup's answers from vLLM


def heldout_triples(cfg: EvalConfig) -> list[tuple[dict, str, dict]]:
    prompts = [p for p in data.load_prompts() if p["split"] != "train"]
    queries = [q for q in data.load_queries() if q["split"] == "heldout"]
    return teacher.pairs(prompts, queries, cfg.queries_per_prompt, cfg.seed, all_descriptions=False)


def as_batch(loras: list[LoRAWeights]) -> tuple[dict, torch.Tensor]:
    """Stack adapters (any ranks: zero-padded to the largest) into the student's per-row format."""
    r = max(lo.rank for lo in loras)
    batch = {}
    for m in loras[0].A:
        A = [torch.nn.functional.pad(lo.A[m], (0, 0, 0, r - lo.rank)) for lo in loras]
        B = [torch.nn.functional.pad(lo.B[m], (0, r - lo.rank)) for lo in loras]
        batch[m] = (torch.stack(A), torch.stack(B))
    return batch, torch.tensor([lo.scaling for lo in loras])


@torch.no_grad()
def kl_per_sample(student: Student, samples: list[teacher.Sample], adapter_of, cfg: EvalConfig,
                  name: str) -> list[float]:
    """Mean per-token KL(teacher || student + adapter) of each sample, on the teacher's answer."""
    kls = []
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc=f"KL {name}", unit="batch"):
        chunk = samples[start:start + cfg.batch_size]
        loras = [adapter_of(s) for s in chunk]
        if loras[0] is None:
            student.set_adapters(None)
        else:
            student.set_adapters(*as_batch(loras))
        batch = student.make_batch([s.student_prompt for s in chunk], [s.response for s in chunk])
        per_token = objectives.distill_kl(student.logits(batch), torch.cat([s.top_ids for s in chunk]),
                                          torch.cat([s.top_logp for s in chunk]))
        offset = 0
        for s in chunk:
            kls.append(per_token[offset:offset + len(s.response)].mean().item())
            offset += len(s.response)
    student.set_adapters(None)
    return kls


def evaluate(cfg: EvalConfig) -> dict:
    from vllm_t2l.models import prepare_default_model

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = Generator.load(cfg.checkpoint)
    model_dir = prepare_default_model()
    student = Student(model_dir, gen.checkpoint.config.target_modules)
    work = Path(cfg.work)
    cache = work / "teacher-heldout.pt"
    if cache.exists():
        samples = teacher.load(cache)
    else:
        samples = teacher.build(student, model_dir, heldout_triples(cfg), cfg.max_new_tokens, cfg.top_k)
        teacher.save(samples, cache)
    prompts = {p["id"]: p for p in data.load_prompts()}
    setups = {"base (no prompt)": (lambda s: None, lambda s: None)}
    checkpoints = {}
    for i, path in enumerate((cfg.checkpoint, *cfg.compare)):
        g = gen if i == 0 else Generator.load(path)
        info = _checkpoint_info(path, g)
        name = setup_name(i, info, setups)
        setups[name] = _generated_setup(g, samples, work / "adapters" / f"checkpoint-{i}", model_dir.name)
        checkpoints[name] = info
    if cfg.multitask:
        mt = LoRAWeights.load_peft(cfg.multitask)
        setups["multi-task LoRA"] = (lambda s: mt, lambda s: cfg.multitask)
    oracle: dict[str, LoRAWeights] = {}
    if cfg.oracles:
        oracle = {p.name: LoRAWeights.load_peft(p) for p in Path(cfg.oracles).iterdir()
                  if (p / "adapter_config.json").exists()}
        setups["oracle LoRA"] = (lambda s: oracle[s.prompt_id], lambda s: str(Path(cfg.oracles) / s.prompt_id))

    rows: dict[str, dict] = {}
    for name, (lora_of, _) in setups.items():
        subset = [s for s in samples if name != "oracle LoRA" or s.prompt_id in oracle]
        rows[name] = {"samples": subset, "kl": kl_per_sample(student, subset, lora_of, cfg, name)}
    if cfg.compliance:
        from vllm_t2l.serving.offline import answer

        jobs = [(name, s) for name, row in rows.items() for s in row["samples"]]  # answered in one engine run
        outs = answer(model_dir, [[{"role": "user", "content": s.query}] for _, s in jobs], cfg.max_new_tokens, 1,
                      adapters=[setups[name][1](s) for name, s in jobs])
        for (name, _), a in zip(jobs, outs):
            rows[name].setdefault("answers", []).append(
                student.tokenizer.decode(a.token_ids, skip_special_tokens=True))
    teacher_answers = [student.tokenizer.decode(s.response, skip_special_tokens=True) for s in samples]
    rows["prompt in context"] = {"samples": samples, "kl": [0.0] * len(samples), "answers": teacher_answers}
    oracle_ids = set(oracle)

    def summary(name: str, only: set[str] | None = None) -> dict:
        row = rows[name]
        pick = [i for i, s in enumerate(row["samples"]) if only is None or s.prompt_id in only]
        kl = sum(row["kl"][i] for i in pick) / max(1, len(pick))
        checked = [(row["answers"][i], prompts[row["samples"][i].prompt_id]["check"]) for i in pick
                   if "answers" in row and prompts[row["samples"][i].prompt_id].get("check")]
        comply = sum(checks.check(spec, a) for a, spec in checked) / len(checked) if checked else float("nan")
        return {"kl": kl, "compliance": comply, "n": len(pick), "n_checked": len(checked)}

    def part(only: set[str] | None = None) -> dict:
        table = {n: summary(n, only) for n in rows}
        base_kl = table["base (no prompt)"]["kl"]
        for v in table.values():
            v["gap_closed"] = 1 - v["kl"] / base_kl if base_kl > 0 and v["n"] else float("nan")
        return table

    result: dict = {"all": part()}
    if oracle_ids:
        result["oracle subset"] = part(oracle_ids)
    families: dict[str, set[str]] = {}
    for s in samples:
        families.setdefault(prompts[s.prompt_id]["family"], set()).add(s.prompt_id)
    result["families"] = {fam: part(ids) for fam, ids in sorted(families.items())}
    saved = [len(student.prompt_ids(s.query, system=s.description)) - len(s.student_prompt) for s in samples]
    result["context_tokens_saved_per_request"] = sum(saved) / len(saved)
    result["checkpoint"] = checkpoints["generated adapter"]
    result["checkpoints"] = checkpoints
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    return result


def setup_name(i: int, info: dict, taken) -> str:
    """The main checkpoint is "generated adapter"; compared ones are named by architecture and size, numbered
    when two share both (else the second would overwrite the first's row)."""
    if i == 0:
        return "generated adapter"
    name = f"generated adapter, {info['arch']} ({info['params'] / 1e6:.2f}M)"
    return f"{name} #{i}" if name in taken else name


def _checkpoint_info(path: str, gen: Generator) -> dict:
    return {"path": path, "id": gen.id, "arch": gen.checkpoint.config.arch,
            "params": sum(p.numel() for p in gen.checkpoint.hypernet.parameters()),
            "steps": gen.checkpoint.card.get("steps")}


def generated_adapters(gen: Generator, samples: list[teacher.Sample]) -> dict[str, LoRAWeights]:
    """One adapter per distinct description of ``samples``, generated in one batch."""
    descs = sorted({s.description for s in samples})
    return dict(zip(descs, gen.generate([spec_from_parts([d]) for d in descs])))


def _generated_setup(gen: Generator, samples: list[teacher.Sample], folder: Path, base_name: str):
    """(adapter of a sample, its PEFT folder) for one hypernetwork: one adapter per description."""
    generated = generated_adapters(gen, samples)
    folders = {d: str(lora.save_peft(folder / f"{i:03d}", base_name)) for i, (d, lora) in enumerate(generated.items())}
    return lambda s: generated[s.description], lambda s: folders[s.description]


def write_report(result: dict, out: Path) -> None:
    lines = [f"# Alignment-prompt quality on held-out descriptions ({result['checkpoint']['arch']}, "
             f"{result['checkpoint']['params']:,} parameters)", ""]
    for part, table in result.items():
        if not isinstance(table, dict) or "base (no prompt)" not in table:
            continue
        lines += [f"## {part}", "", "| setup | KL per token | share of base gap closed | compliance | samples |",
                  "|---|---|---|---|---|"]
        for name, v in table.items():
            comply = f"{v['compliance']:.1%} ({v['n_checked']})" if v["n_checked"] else "not measured"
            lines.append(f"| {name} | {v['kl']:.4f} | {v['gap_closed']:.1%} | {comply} | {v['n']} |")
        lines.append("")
    if families := result.get("families"):
        names = [n for n in next(iter(families.values())) if n not in ("base (no prompt)", "prompt in context")]
        lines += ["## share of base gap closed, by family", "", "| family | samples | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for fam, table in families.items():
            cells = [f"{table[n]['gap_closed']:.1%}" if table[n]["n"] else "-" for n in names]
            lines.append(f"| {fam} | {table['base (no prompt)']['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Context tokens saved per request: {result['context_tokens_saved_per_request']:.1f}")
    if checkpoints := result.get("checkpoints"):
        lines += ["", "| hypernetwork setup | checkpoint | id | steps |", "|---|---|---|---|"]
        lines += [f"| {name} | `{c['path']}` | {c['id']} | {c.get('steps') or '?'} |"
                  for name, c in checkpoints.items()]
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        table = result["all"]
        names = list(table)
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        ax[0].barh(names, [table[n]["kl"] for n in names])
        ax[0].set_xlabel("KL(teacher || model) per token")
        ax[1].barh(names, [table[n]["compliance"] for n in names])
        ax[1].set_xlabel("compliance with checkable prompts")
        fig.tight_layout()
        fig.savefig(out / "quality.png", dpi=120)
    except ImportError:
        pass
