"""The embedded default model: a tiny Qwen2-MoE (a shared expert behind its sigmoid gate, 8 routed
experts, top-2) pretrained on the general mix of `training.corpus`, with a locally trained BPE tokenizer.
Reuses the data pipeline and `Trainer`; the result is a normal `save_pretrained` folder."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from flexmore.storage import atomic_dir, atomic_write_text
from flexmore.training.data import BatchIterator, load_texts, pack, split_heldout
from flexmore.training.loop import RESULT_FILE, TrainConfig, Trainer, heldout_loss
from flexmore.training.tokenizer import train_tokenizer


@dataclass(frozen=True)
class TinyMoEConfig:
    vocab_size: int = 2048
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 128
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyMoEConfig.{name} must be a positive int, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"TinyMoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts")

    def qwen2_moe(self, eos_token_id: int) -> Qwen2MoeConfig:
        return Qwen2MoeConfig(
            **asdict(self),
            intermediate_size=self.shared_expert_intermediate_size,
            pad_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
        )


def default_pretrain_train() -> TrainConfig:
    # ~3 minutes on 2 CPU cores
    return TrainConfig(steps=300, batch_size=16, seq_len=128, lr=4e-3, warmup=30, eval_batches=8)


@dataclass(frozen=True)
class TinyPretrainConfig:
    out: Path
    data: str = "embedded:general"
    model: TinyMoEConfig = field(default_factory=TinyMoEConfig)
    train: TrainConfig = field(default_factory=default_pretrain_train)
    max_docs: int | None = 3000  # the first documents of the mix: minutes on 2 CPU cores, not hours

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"out": str(self.out)}


def pretrain_tiny_moe(config: TinyPretrainConfig) -> dict[str, Any]:
    """Train and save the tiny model to `config.out` (atomically); returns its result record."""
    start = time.perf_counter()
    tc = config.train
    docs = load_texts(config.data, max_docs=config.max_docs)
    train_docs, held_docs = split_heldout(docs, 0.05, seed=tc.seed)
    tokenizer = train_tokenizer(train_docs, config.model.vocab_size, seed=tc.seed)
    blocks, heldout = pack(train_docs, tokenizer, tc.seq_len), pack(held_docs, tokenizer, tc.seq_len)  # (N, T)
    torch.manual_seed(tc.seed)
    model = Qwen2MoeForCausalLM(config.model.qwen2_moe(tokenizer.eos_token_id))
    result = Trainer(model, tc, BatchIterator(blocks, tc.batch_size, seed=tc.seed), heldout).run()
    record = {
        "kind": "flex-tiny-moe",
        "config": config.to_dict(),
        "train_loss": result.train_loss,
        "heldout_loss": heldout_loss(model, heldout, batch_size=tc.batch_size, max_batches=tc.eval_batches),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start,
    }
    with atomic_dir(Path(config.out), overwrite=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / RESULT_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return record


EMBEDDED_MODEL = "embedded"
_EMBEDDED_NAME = "flex-tiny-qwen2-moe-v1"


def embedded_model_dir() -> Path:
    import os

    root = Path(os.environ.get("FLEXMORE_CACHE", Path.home() / ".cache" / "flexmore"))
    return root / _EMBEDDED_NAME


def resolve_model(source: str, echo: Any = None) -> str:
    """`embedded`: the tiny Qwen2-MoE, pretrained on first use (a few minutes) into the cache; anything
    else (a folder or Hub id) is returned as is."""
    if source != EMBEDDED_MODEL:
        return str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else source
    folder = embedded_model_dir()
    if not (folder / "config.json").is_file():
        if echo is not None:
            echo(f"pretraining the embedded tiny Qwen2-MoE into {folder} (once; a few minutes)")
        pretrain_tiny_moe(TinyPretrainConfig(out=folder))
    return str(folder)
