"""Held-out loss, perplexity and next-token accuracy per domain: the always-available second measure.

Same documents as the embedded benchmarks (`embedded.heldout_documents`, what train-expert holds out),
packed into blocks and scored by `training.loop.heldout_stats`, the function training evaluates with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flexmore.evaluation.embedded import EmbeddedConfig, heldout_documents
from flexmore.training.data import pack
from flexmore.training.loop import TrainConfig, heldout_stats


@dataclass(frozen=True)
class HeldoutScore:
    domain: str
    loss: float
    ppl: float
    token_acc: float
    tokens: int


def heldout_scores(
    model: nn.Module,
    tokenizer: Any,
    domains: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    config: EmbeddedConfig | None = None,
    seq_len: int = 256,
    batch_size: int = 16,
    max_blocks: int | None = 64,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> list[HeldoutScore]:
    """Per domain (an embedded domain name, or name -> documents), the held-out scores on at most
    `max_blocks` blocks of `seq_len` tokens (None: all)."""
    docs: Mapping[str, Sequence[str]] = (
        domains if isinstance(domains, Mapping) else {d: heldout_documents(d, config) for d in domains}
    )
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        seq_len = int(limit)  # a longer block would run past the rotary table
    scores = []
    for name, texts in docs.items():
        if not texts:
            raise ValueError(f"held-out data {name!r}: no documents")
        try:
            blocks = pack(list(texts), tokenizer, seq_len)  # (N, T)
        except ValueError as err:
            raise ValueError(f"held-out data {name!r}: {err}") from err
        if max_blocks is not None:
            blocks = blocks[:max_blocks]
        n_batches = math.ceil(blocks.shape[0] / batch_size)
        train = TrainConfig(batch_size=batch_size, seq_len=max(seq_len, 2), device=device)

        def report(done: int, total: int, name: str = name) -> None:
            if progress is not None:
                progress(done, total, f"held-out {name}")

        with torch.inference_mode():
            stats = heldout_stats(
                model, blocks, batch_size=batch_size, max_batches=n_batches, config=train, progress=report
            )
        scores.append(
            HeldoutScore(
                domain=name, loss=stats.loss, ppl=math.exp(stats.loss), token_acc=stats.token_acc, tokens=stats.tokens
            )
        )
    return scores
