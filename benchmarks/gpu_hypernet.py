"""Hypernetwork and codes hand-off timed on a GPU with torch alone (no vLLM), at 7-8B base-model shapes.

    python -m benchmarks.gpu_hypernet [--device cuda] [--batches 1,16,64,256] [--repeats 20]
                                      [--targets qv,all] [--archs zhyper-diag,t2l-L] [--out DIR]

What a cache miss costs on a GPU server, step by step, per batch of N new descriptions (the embedder is
left out: it is a separate, already measured model):
- `forward`: the hypernetwork on the device. Zhyper: ``FoldedCodes`` (the served path stops at the codes);
  T2L: the full A and B of every targeted layer;
- `to host`: what the resolver hands to vLLM, copied to host memory (codes: kilobytes; T2L: full weights);
- `write`: written as the resolver does, with ``tensorfile`` (one file per adapter, in a temporary folder);
- `expand` (zhyper only): the worker's side, codes to A = diag(z) A_shared on the device, per adapter.
Latency is the median of ``--repeats`` timed runs after a warm-up, with the device synchronised; adapters/s
is N over forward + to host + write. Shapes: Mistral-7B and Llama-3.1-8B (32 layers, hidden 4096, 32 query
and 8 key/value heads of 128, MLP 14336 for both: their projections have the same shapes), targets q/v or
all seven projections, rank 8. Weights are random: time does not depend on them. Runs on CPU too
(``--device cpu``, small settings), to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report
from vllm_t2l import tensorfile
from vllm_t2l.hypernet import BaseShapes, FoldedCodes, HyperConfig, HyperNet, expand_codes

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"qv": ("q_proj", "v_proj"), "all": SEVEN}
CONFIGS = {  # the config.json fields BaseShapes reads
    "Mistral-7B": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "intermediate_size": 14336, "num_hidden_layers": 32},
    "Llama-3.1-8B": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "head_dim": 128},
}


def timed(fn, repeats: int, sync) -> list[float]:
    """Milliseconds of ``repeats`` calls after one warm-up call, the device synchronised around each."""
    fn()
    sync()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def handed_off(out) -> list[torch.Tensor]:
    """The tensors a miss hands to vLLM: codes ``{m: z}`` or weights ``{m: (A, B)}``."""
    return [t for v in out.values() for t in (v if isinstance(v, tuple) else (v,))]


def one_batch(net: HyperNet, fn, n: int, repeats: int, device: str, sync, tmp: Path) -> dict:
    """The timings of one batch of ``n`` new descriptions."""
    emb = torch.randn(n, 384, device=device)
    out = fn(emb)
    row = {"forward": timed(lambda: fn(emb), repeats, sync),
           "to_host": timed(lambda: [t.cpu() for t in handed_off(out)], repeats, sync)}
    on_host = {f"{m}.{k}": t.cpu() for m, v in out.items()
               for k, t in zip("AB" if isinstance(v, tuple) else "z", v if isinstance(v, tuple) else (v,))}

    def write() -> None:
        for i in range(n):
            tensorfile.save(tmp / f"{i}.safetensors", [([name], t[i][None]) for name, t in on_host.items()],
                            {"format": "pt"})
    row["write"] = timed(write, max(1, repeats // 4), sync)
    if isinstance(fn, FoldedCodes):
        one = {m: z[:1] for m, z in out.items()}
        row["expand"] = timed(lambda: [expand_codes(z, net.shared_A[m]) for m, z in one.items()], repeats, sync)
    row["bytes"] = sum(t.numel() * t.element_size() for t in handed_off(out)) // n
    return row


def measure(model: str, targets: str, arch: str, batches: list[int], repeats: int, device: str,
            rank: int) -> list[dict]:
    """Every batch size for one (base model shapes, targets, architecture)."""
    shapes = BaseShapes.from_config(CONFIGS[model], TARGETS[targets], name=model)
    net = HyperNet(HyperConfig(arch=arch, emb_dim=384, rank=rank, target_modules=TARGETS[targets]), shapes)
    net = net.to(device).eval()
    fn = FoldedCodes(net) if arch.startswith("zhyper") else net
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="t2l-gpu-") as tmp:
        for n in batches:
            t = one_batch(net, fn, n, repeats, device, sync, Path(tmp))
            row = {"model": model, "targets": targets, "arch": arch, "rank": rank, "batch": n,
                   "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "handoff_bytes_per_adapter": t["bytes"],
                   "forward_ms": statistics.median(t["forward"]), "forward_p95_ms": report.pct(t["forward"], 95),
                   "to_host_ms": statistics.median(t["to_host"]), "write_ms": statistics.median(t["write"])}
            if "expand" in t:
                row["expand_ms_per_adapter"] = statistics.median(t["expand"])
            row["miss_ms"] = row["forward_ms"] + row["to_host_ms"] + row["write_ms"]
            row["adapters_per_s"] = n / row["miss_ms"] * 1e3
            rows.append(row)
            print(f"{model:<13} {targets:<3} {arch:<12} N={n:<4} forward {row['forward_ms']:8.2f} ms  to host "
                  f"{row['to_host_ms']:7.2f} ms  write {row['write_ms']:7.2f} ms  {row['adapters_per_s']:9.0f} "
                  "adapters/s", flush=True)
    del net, fn
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--targets", default="qv,all")
    parser.add_argument("--archs", default="zhyper-diag,t2l-L")
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "gpu_hypernet: no CUDA device visible to torch; use --device cpu to check the script\n")
    batches = [int(b) for b in args.batches.split(",")]
    rows = [r for model in args.models.split(",") for targets in args.targets.split(",")
            for arch in args.archs.split(",")
            for r in measure(model, targets, arch, batches, args.repeats, args.device, args.rank)]
    ctx = report.context("benchmarks.gpu_hypernet")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    md = ["# Hypernetwork and codes hand-off, torch only", "",
          f"`{ctx['command']}` ({ctx['date']}, {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads). Rank {args.rank}; ms are medians of {args.repeats} runs (write: of a quarter as many); "
          "adapters/s = N / (forward + to host + write). expand: the worker's codes -> A on the device, one "
          "adapter.", "",
          *report.table(["model", "targets", "arch", "N", "params (M)", "hand-off KiB / adapter", "forward ms",
                         "forward p95", "to host ms", "write ms", "expand ms", "adapters/s"],
                        [[r["model"], r["targets"], r["arch"], r["batch"], r["params_m"],
                          r["handoff_bytes_per_adapter"] / 1024, r["forward_ms"], r["forward_p95_ms"],
                          r["to_host_ms"], r["write_ms"], f"{r.get('expand_ms_per_adapter', float('nan')):.2f}",
                          f"{r['adapters_per_s']:.0f}"] for r in rows])]
    path = report.write(args.out, "gpu_hypernet", "\n".join(md), {"context": ctx, "device": name, "rows": rows})
    print(path.read_text())


if __name__ == "__main__":
    main()
