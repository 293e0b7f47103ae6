"""What the evaluation reports per client: ROUGE-L of greedy generations, expert load balance, and the
held-out loss of the general corpus (knowledge retention; `training.loop.heldout_loss`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rouge_score import rouge_scorer
from torch import nn

from .adapters import moe_blocks


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, with stemming), in [0, 1]."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)) / len(
        references
    )


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding to get wrong), cut at eos."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)  # (1, T)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )  # (1, T + n)
            out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


class ExpertLoad:
    """Counts how often each routed expert is among a token's top-k, per MoE layer, while active."""

    def __init__(self, model: nn.Module, top_k: int) -> None:
        self.top_k = top_k
        self.counts: dict[int, torch.Tensor] = {}
        self.handles = []
        for layer, block in moe_blocks(model).items():
            self.handles.append(block.gate.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int) -> Any:
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            logits = out[0] if isinstance(out, tuple) else out  # (N, E)
            idx = logits.topk(self.top_k, dim=-1).indices.reshape(-1)  # (N*k,)
            counts = torch.bincount(idx.cpu(), minlength=logits.shape[-1])  # (E,)
            self.counts[layer] = self.counts.get(layer, torch.zeros_like(counts)) + counts

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def std(self) -> float:
        """Standard deviation over experts of their activation frequencies, averaged over layers."""
        if not self.counts:
            raise ValueError("no tokens were routed while recording")
        stds = [(c.double() / c.sum()).std(unbiased=False) for c in self.counts.values()]
        return float(torch.stack(stds).mean())
