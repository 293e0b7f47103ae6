"""Domain-informed router rows (FlexOlmo): an expert's row starts from the mean representation of a
sample of its owner's documents, so the router sends similar tokens to it before any training.

Representation: the input of each layer's MoE block (the residual stream after attention) under the
public model, averaged over each document's tokens, then over documents. Or, with an embedding function
(`documents -> (N, H)` tensor, FlexOlmo used an off-the-shelf embedder), its mean embedding for every layer.

Scaling: a row is `scale * m / (|m| * rho)` with `m` the mean representation and `rho` the mean norm of
one token's MoE input in that layer. A typical token then gets the logit `scale * cos(h, m) * |h| / rho`,
about `scale * cos(h, m)`: O(scale) whatever the hidden size or the residual stream's magnitude, where a
raw mean would give logits ~|h|^2 and saturate the softmax. The public row is set the same way from the
public data, so rows of experts trained apart are comparable when composed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# Router rows give a centroid token a logit of about ROUTER_SCALE: experts' rows differ by a few units.
ROUTER_SCALE = 4.0
EmbedFn = Callable[[Sequence[str]], torch.Tensor]  # documents -> (N, H) embeddings


def router_sample(docs: Sequence[str], n: int, seed: int) -> list[str]:
    """A seeded sample of n documents (all if fewer): the router row must not depend on document order."""
    if len(docs) <= n:
        return list(docs)
    return random.Random(f"flexmore:router:{seed}").sample(list(docs), n)


def moe_blocks(model: nn.Module) -> list[Any]:
    """The MoE block (`mlp`: `gate` router, `experts`) of every decoder layer of a FlexOlmo-like causal LM."""
    decoder: Any = model.model
    return [layer.mlp for layer in decoder.layers]


@torch.no_grad()
def mean_moe_inputs(
    model: nn.Module,
    tokenizer: Any,
    docs: Sequence[str],
    *,
    max_tokens: int = 256,
    batch_size: int = 16,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(means (L, H), rho (L,)): per layer, the mean over documents of each document's mean MoE input
    (its first `max_tokens` tokens), and the mean norm of a token's MoE input."""
    if not docs:
        raise ValueError("mean_moe_inputs needs at least one document")
    encoded = tokenizer(list(docs), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    encoded = [ids[:max_tokens] for ids in encoded if ids]
    if not encoded:
        raise ValueError("mean_moe_inputs: every document is empty after tokenisation")
    blocks = moe_blocks(model)
    L = len(blocks)
    captured: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float())) for b in blocks]
    config: Any = model.config
    doc_means = torch.zeros(L, config.hidden_size, dtype=torch.float64)
    norm_sum = torch.zeros(L, dtype=torch.float64)
    tokens = 0
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad little
    try:
        for start in range(0, len(order), batch_size):
            rows = [encoded[i] for i in order[start : start + batch_size]]
            T = max(len(r) for r in rows)
            pad = tokenizer.pad_token_id or 0
            ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)  # (B, T)
            # Right padding needs no attention mask: a causal real token never sees a later pad.
            mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in rows], dtype=torch.float64)  # (B, T)
            captured.clear()
            model(input_ids=ids)
            for layer, h in enumerate(captured):
                h = h.to("cpu", torch.float64).reshape(len(rows), T, -1)  # (B, T, H)
                per_doc = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, H)
                doc_means[layer] += per_doc.sum(0)
                norm_sum[layer] += (h.norm(dim=-1) * mask).sum()
            tokens += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return (doc_means / len(encoded)).float(), (norm_sum / tokens).float()


def router_rows(means: torch.Tensor, rho: torch.Tensor, scale: float) -> torch.Tensor:
    """(L, H) router rows `scale * m / (|m| * rho)` from per-layer means (L, H) and token norms (L,)."""
    norm = means.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (L, 1)
    return scale * means / (norm * rho.clamp_min(1e-12)[:, None])  # (L, H)


def domain_router_rows(
    model: nn.Module,
    tokenizer: Any,
    docs: Sequence[str],
    *,
    scale: float,
    embed: EmbedFn | None = None,
    max_tokens: int = 256,
    device: str = "cpu",
) -> torch.Tensor:
    """(L, H) router rows for the documents' domain (see the module docstring)."""
    means, rho = mean_moe_inputs(model, tokenizer, docs, max_tokens=max_tokens, device=device)
    if embed is not None:
        emb = torch.as_tensor(embed(list(docs))).float()  # (N, D)
        H = means.shape[1]
        if emb.ndim != 2 or emb.shape != (len(docs), H):
            raise ValueError(f"the router-init embedding gave shape {tuple(emb.shape)}, expected ({len(docs)}, {H})")
        means = emb.mean(0).expand_as(means)  # (L, H): one row for every layer
    return router_rows(means, rho, scale)
