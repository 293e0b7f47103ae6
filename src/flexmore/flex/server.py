"""The server's starting point: the shared tensors every client begins from (seeded, so that a rerun
and every client agree; LoRA's B starts at zero, so the first global model is the pretrained one)."""

from __future__ import annotations

import torch

from .client import load_model
from .config import FlexConfig
from .shared import build_trainable, shared_state


def initial_shared(config: FlexConfig) -> dict[str, torch.Tensor]:
    model, _ = load_model(config)
    torch.manual_seed(config.seed)
    model = build_trainable(model, config.method, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                            shared=config.shared)  # type: ignore[arg-type]  # fmt: skip
    return shared_state(model)
