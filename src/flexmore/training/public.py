"""Pretrain the tiny public model: a FlexOlmo with one expert (top-1: a dense model in MoE clothes) on the
public `general` mix, with a byte-level BPE tokenizer trained locally on the same text.

The output is a normal FlexOlmo checkpoint (`save_pretrained` + tokenizer) that expert training upcycles
and `compose --public` reads. Its router has one row, whose gradient is always zero (softmax over one
expert); after training it is set from the mean MoE input of public documents (`training.router`), the
public expert's domain-informed row, scaled like every expert row trained later.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

from flexmore.storage import atomic_dir, atomic_write_text
from flexmore.training.data import BatchIterator, fingerprint, load_texts, pack, split_heldout
from flexmore.training.loop import (
    RESULT_FILE,
    TrainConfig,
    Trainer,
    TrainResult,
    TrainStatus,
    checkpoint_dir_for,
    heldout_loss,
)
from flexmore.training.router import ROUTER_SCALE, domain_router_rows, moe_blocks, router_sample
from flexmore.training.tokenizer import train_tokenizer


@dataclass(frozen=True)
class PublicModelConfig:
    """The architecture. Default: ~1.45M parameters, 2/3 of them the 4096-token embeddings and head."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 352  # 2.75 x hidden
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10_000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PublicModelConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < 258:
            raise ValueError(
                f"PublicModelConfig.vocab_size must be >= 258 (bytes, eos and a merge), got {self.vocab_size!r}"
            )
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"PublicModelConfig.num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size}) into an even head size"
            )

    def flexolmo(self, eos_token_id: int) -> FlexOlmoConfig:
        return FlexOlmoConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            num_experts=1,
            num_experts_per_tok=1,
            pad_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
        )


def default_public_train() -> TrainConfig:
    # ~1.2M tokens (about one epoch of the general mix) in ~2 minutes on 2 CPU cores.
    return TrainConfig(steps=300, batch_size=16, seq_len=256, lr=3e-3, warmup=30, eval_every=100, eval_batches=16)


@dataclass(frozen=True)
class PretrainConfig:
    out: Path
    data: str = "embedded:general"
    model: PublicModelConfig = field(default_factory=PublicModelConfig)
    train: TrainConfig = field(default_factory=default_public_train)
    heldout_fraction: float = 0.05
    tokenizer_max_chars: int = 4_000_000
    router_docs: int = 256  # documents whose mean MoE input sets the public router row
    router_scale: float = ROUTER_SCALE
    text_field: str = "text"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"PretrainConfig.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        for name in ("tokenizer_max_chars", "router_docs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PretrainConfig.{name} must be a positive int, got {value!r}")
        if not (math.isfinite(self.router_scale) and self.router_scale > 0):
            raise ValueError(f"PretrainConfig.router_scale must be a positive number, got {self.router_scale!r}")
        if self.train.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"PretrainConfig.train.seq_len ({self.train.seq_len}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"out": str(self.out)}


@dataclass
class PretrainResult:
    out: Path
    parameters: int
    train: TrainResult
    heldout_loss: float
    unigram_loss: float  # held-out cross-entropy of the training unigram distribution: the bar to beat
    seconds: float  # everything: data, tokenizer, training, router, saving

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"out": str(self.out)}


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one-smoothed training unigram frequencies."""
    counts = torch.bincount(train.reshape(-1), minlength=vocab_size).double() + 1.0  # (V,)
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout[:, 1:].reshape(-1)].mean())


def pretrain(
    config: PretrainConfig, progress: Callable[[TrainStatus], None] | None = None, resume: bool = True
) -> PretrainResult:
    """Train the public model and write it to `config.out` (atomically); resume from its checkpoint folder
    if `resume` and one exists (checkpoints need `train.checkpoint_every > 0`)."""
    start = time.perf_counter()
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    tc = config.train
    docs = load_texts(config.data, config.text_field)
    train_docs, held_docs = split_heldout(docs, config.heldout_fraction, seed=tc.seed)
    tokenizer = train_tokenizer(train_docs, config.model.vocab_size, seed=tc.seed, max_chars=config.tokenizer_max_chars)
    if len(tokenizer) != config.model.vocab_size:
        raise ValueError(
            f"{config.data}: the tokenizer learned only {len(tokenizer)} tokens; lower vocab_size to at most that"
        )
    blocks = pack(train_docs, tokenizer, tc.seq_len)  # (N, T)
    heldout = pack(held_docs, tokenizer, tc.seq_len)  # (M, T)

    torch.manual_seed(tc.seed)  # the initial weights depend on the seed only
    model = FlexOlmoForCausalLM(config.model.flexolmo(tokenizer.eos_token_id))
    nn.Module.to(model, tc.device)
    for block in moe_blocks(model):
        block.gate.weight.requires_grad_(False)  # its gradient is zero; set from data below
    batches = BatchIterator(blocks, tc.batch_size, seed=tc.seed)
    ckpt = checkpoint_dir_for(out)
    trainer = Trainer(model, tc, batches, heldout, checkpoint_dir=ckpt if tc.checkpoint_every else None)
    if resume and (ckpt / "trainer.json").is_file():
        trainer.load_checkpoint(ckpt)
    result = trainer.run(progress=progress)

    sample = router_sample(train_docs, config.router_docs, tc.seed)
    rows = domain_router_rows(model, tokenizer, sample, scale=config.router_scale, device=tc.device)
    with torch.no_grad():
        for block, row in zip(moe_blocks(model), rows, strict=True):
            block.gate.weight.copy_(row[None])  # (1, H)
    # The router cannot change a 1-expert model's output: the final loss stands.
    loss = heldout_loss(model, heldout, batch_size=tc.batch_size, config=tc)
    report = PretrainResult(
        out=out,
        parameters=sum(p.numel() for p in model.parameters()),
        train=result,
        heldout_loss=loss,
        unigram_loss=unigram_loss(blocks, heldout, config.model.vocab_size),
        seconds=0.0,
    )
    with atomic_dir(out, config.overwrite) as tmp:
        nn.Module.to(model, "cpu")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report.seconds = time.perf_counter() - start
        meta = {
            "kind": "public",
            "config": config.to_dict(),
            "result": report.to_dict(),
            "data": {"source": config.data, "sha256": fingerprint(train_docs), "heldout_docs": len(held_docs)},
        }
        atomic_write_text(tmp / RESULT_FILE, json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)  # the artefact is complete: its checkpoints are spent
    return report
