"""Tiny FlexOlmo checkpoints built from a config, for the demo and the tests (no download).

Domain experts are the public expert plus a delta with a decaying spectrum, like a fine-tune's,
so that truncation at small ranks is meaningful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM


def tiny_config(num_experts: int = 3, **overrides: Any) -> FlexOlmoConfig:
    fields: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=num_experts,
        num_experts_per_tok=min(2, num_experts),
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    fields.update(overrides)
    return FlexOlmoConfig(**fields)


def spectral_delta(d_out: int, d_in: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """A (d_out, d_in) matrix with singular values ~ scale * i^-0.8: a fine-tune's delta, roughly."""
    k = min(d_out, d_in)
    U, _ = torch.linalg.qr(torch.randn(d_out, k, generator=generator))  # (d_out, k)
    V, _ = torch.linalg.qr(torch.randn(d_in, k, generator=generator))  # (d_in, k)
    s = scale * torch.arange(1, k + 1, dtype=torch.float32) ** -0.8  # (k,)
    return (U * s) @ V.T  # (d_out, d_in)


@torch.no_grad()
def tiny_flexolmo(config: FlexOlmoConfig, seed: int = 0, delta_scale: float = 0.05) -> FlexOlmoForCausalLM:
    """A random FlexOlmo whose experts 1.. are expert 0 plus a spectral delta; router rows spread."""
    torch.manual_seed(seed)
    model = FlexOlmoForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        gate_up = experts.gate_up_proj  # (E, 2I, H)
        down = experts.down_proj  # (E, H, I)
        for e in range(1, config.num_experts):
            gate_up[e] = gate_up[0] + spectral_delta(gate_up.shape[1], gate_up.shape[2], delta_scale, gen)
            down[e] = down[0] + spectral_delta(down.shape[1], down.shape[2], delta_scale, gen)
        # Stock init is N(0, 0.02): too flat to exercise routing; spread the router rows.
        layer.mlp.gate.weight.normal_(0.0, 1.0, generator=gen)
    return model


def save_tiny_flexolmo(
    folder: Path, config: FlexOlmoConfig, seed: int = 0, max_shard_size: str | None = None
) -> FlexOlmoForCausalLM:
    model = tiny_flexolmo(config, seed=seed)
    if max_shard_size:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(folder)
    return model
