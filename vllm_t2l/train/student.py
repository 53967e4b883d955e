"""The base model with per-row LoRA slots: every row of a batch can carry its own adapter.

Training needs gradients to flow from the language model's loss into the hypernetwork, so the
adapters are applied functionally here (y = W x + s * B (A x)) instead of through peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vllm_t2l.hypernet import MODULE_PARENT, LoRABatch


class LoRASlot(nn.Module):
    """Wraps one frozen linear layer; ``A [N, r, in]``, ``B [N, out, r]`` are set per batch."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.A: Tensor | None = None
        self.B: Tensor | None = None
        self.scaling: Tensor | float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.A is None:
            return y
        h = torch.einsum("nti,nri->ntr", x, self.A.to(x.dtype))
        delta = torch.einsum("ntr,nor->nto", h, self.B.to(x.dtype))
        scaling = self.scaling
        if isinstance(scaling, Tensor):
            scaling = scaling.to(x.dtype)[:, None, None]
        return y + scaling * delta


@dataclass
class Batch:
    input_ids: Tensor  # [N, T] right-padded
    attention_mask: Tensor  # [N, T]
    rows: Tensor  # [K] row index of each predicted token
    positions: Tensor  # [K] position whose output predicts it
    targets: Tensor  # [K] the token


class Student:
    """A frozen causal LM (Llama-style) whose target modules accept per-row adapters."""

    def __init__(self, model_dir: str | Path, target_modules: tuple[str, ...], dtype=torch.float32,
                 device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        self.slots: dict[str, list[LoRASlot]] = {m: [] for m in target_modules}
        for layer in self.model.model.layers:
            for m in target_modules:
                parent = getattr(layer, MODULE_PARENT[m])
                slot = LoRASlot(getattr(parent, m))
                setattr(parent, m, slot)
                self.slots[m].append(slot)

    def set_adapters(self, batch: LoRABatch | None, scaling: Tensor | float = 1.0) -> None:
        """Install adapters (A [N, L, r, in], B [N, L, out, r]); None removes them."""
        for m, slots in self.slots.items():
            for i, slot in enumerate(slots):
                if batch is None:
                    slot.A = slot.B = None
                else:
                    slot.A, slot.B = batch[m][0][:, i], batch[m][1][:, i]
                    slot.scaling = scaling

    # ---- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, query: str, system: str | None = None) -> list[int]:
        """Chat-formatted prompt; without ``system`` the template's own default applies, as served."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": query}]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def make_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> Batch:
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        rows, positions, targets = [], [], []
        for n, (p, r) in enumerate(zip(prompts, responses)):
            ids[n, : len(p) + len(r)] = torch.tensor(p + r)
            mask[n, : len(p) + len(r)] = 1
            for j, tok in enumerate(r):
                rows.append(n)
                positions.append(len(p) + j - 1)
                targets.append(tok)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return Batch(ids.to(self.device), mask.to(self.device), t(rows), t(positions), t(targets))

    def logits(self, batch: Batch) -> Tensor:
        """[K, vocab] logits for the predicted tokens only (the LM head is the costly part)."""
        hidden = self.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return self.model.lm_head(hidden[batch.rows, batch.positions]).float()

    def _left_padded(self, prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for n, p in enumerate(prompts):
            ids[n, width - len(p):] = torch.tensor(p)
            mask[n, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, unprompted: list[list[int]] | None = None,
                 guidance: float = 1.0) -> list[list[int]]:
        """Greedy continuations (with whatever adapters are installed), eos included when reached.

        With ``unprompted`` (the same conversations without the description) and ``guidance`` g, each token is the
        argmax of ``l_unprompted + g (l_prompt - l_unprompted)``: the amplified teacher (classifier-free guidance,
        transformers' own), which the 135M model needs before many descriptions show in its answers at all.
        """
        ids, mask = self._left_padded(prompts)
        extra = {}
        if unprompted is not None and guidance != 1:
            neg_ids, neg_mask = self._left_padded(unprompted)
            extra = {"guidance_scale": guidance, "negative_prompt_ids": neg_ids,
                     "negative_prompt_attention_mask": neg_mask}
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id or 0, **extra)
        eos = self.tokenizer.eos_token_id
        result = []
        for row in out[:, ids.shape[1]:].tolist():
            result.append(row[: row.index(eos) + 1] if eos in row else row)
        return result
