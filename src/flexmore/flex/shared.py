"""What trains and what travels, per method (selective aggregation).

- flex, flex-nogate: PEFT LoRA on the family's attention projections (PEFT's default targets), or with
  `shared="dense"` those attention projections themselves; these are the only tensors that travel. The
  grafted expert and gate train too but stay personal. Experts, the shared expert and routers are frozen.
- fedavg, fedprox, fedavgm (the naive full aggregation): LoRA on the same attention projections plus
  LoRA on every routed expert (PEFT `target_parameters` on the fused expert tensors) and on the shared
  expert where the family has one; all of it travels.
- local: the baselines' adapters, trained by each client alone; nothing travels.

Tensor names are the model's parameter names without PEFT's `base_model.model.` prefix.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from .adapters import family_of
from .gate import BRANCH

METHODS = ("flex", "flex-nogate", "fedavg", "fedprox", "fedavgm", "local")
GRAFTED = ("flex", "flex-nogate")
SharedKind = Literal["lora", "dense"]
_PREFIX = "base_model.model."


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def build_trainable(
    model: nn.Module, method: str, *, lora_rank: int = 8, lora_alpha: int = 16, shared: SharedKind = "lora"
) -> nn.Module:
    """`model` with the method's trainable parameters (everything else frozen)."""
    family = family_of(model)
    check_method(method)
    if shared not in ("lora", "dense"):
        raise ValueError(f"shared must be 'lora' or 'dense', got {shared!r}")
    if method in GRAFTED and shared == "dense":
        for name, p in model.named_parameters():
            p.requires_grad_(name.rsplit(".", 2)[-2] in family.lora_targets)
        return model
    targets = list(family.lora_targets)
    params: list[str] = []
    if method not in GRAFTED:
        params = ["experts.gate_up_proj", "experts.down_proj"]
        if family.shared_expert:
            targets += [f"{family.shared_expert[0]}.{m}" for m in family.dense_mlp]
    config = LoraConfig(
        r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets, target_parameters=params or None
    )
    return get_peft_model(model, config)


def _short(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


def enable_grafts(model: nn.Module) -> None:
    """PEFT freezes everything it did not add: the grafts train again."""
    for name, p in model.named_parameters():
        if f".{BRANCH}." in name:
            p.requires_grad_(True)


def shared_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {_short(n): p for n, p in model.named_parameters() if p.requires_grad and f".{BRANCH}." not in n}


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a client sends: its trainable non-personal parameters, float32 on the CPU."""
    return {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in shared_params(model).items()}


def load_shared(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = shared_params(model)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"shared tensors differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"shared tensor {name}: shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[name])
