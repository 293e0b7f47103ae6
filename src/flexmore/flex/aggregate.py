"""The server's math on the shared tensors, and its per-round checkpoint. Pure torch, no Flower.

- FedAvg: w = sum_i n_i w_i / sum_i n_i, per key (n_i: the client's training examples).
- FedProx: the same average; the proximal term mu/2 |w - w_global|^2 acts on the clients (`proximal`).
- FedAvgM: the server treats w_global - avg as a gradient with momentum beta and step lr
  (Hsu et al. 2019): v = beta v + (w_global - avg); w_global = w_global - lr v. beta = 0, lr = 1 is FedAvg.

The checkpoint (`save_checkpoint`): `global.safetensors` (the shared tensors, and `momentum.*` for
FedAvgM) and `server.json` (the round it completes, the method), written into one folder atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexmore.storage import atomic_dir

STATE, META = "global.safetensors", "server.json"


def weighted_mean(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Per-key mean of the clients' tensors weighted by their example counts; every client sends the same keys."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    keys = set(updates[0][0])
    total = 0.0
    for i, (tensors, weight) in enumerate(updates):
        if set(tensors) != keys:
            raise ValueError(f"update {i} carries other keys than update 0: {sorted(set(tensors) ^ keys)[:3]}")
        if not weight > 0:
            raise ValueError(f"update {i} has weight {weight!r}; weights must be positive")
        total += weight
    out = {}
    for key in sorted(keys):
        acc = torch.zeros_like(updates[0][0][key], dtype=torch.float64)
        for tensors, weight in updates:
            acc += tensors[key].to(torch.float64) * weight
        out[key] = (acc / total).to(torch.float32)
    return out


@dataclass
class ServerState:
    """The global shared tensors after `round` rounds (and FedAvgM's momentum)."""

    round: int
    tensors: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)


def server_update(
    state: ServerState, average: Mapping[str, torch.Tensor], *, momentum: float = 0.0, server_lr: float = 1.0
) -> ServerState:
    """The next global state from the clients' weighted mean (FedAvgM when momentum > 0 or lr != 1)."""
    if momentum == 0.0 and server_lr == 1.0:
        return ServerState(state.round + 1, {k: v.clone() for k, v in average.items()}, {})
    new, velocity = {}, {}
    for key, avg in average.items():
        delta = state.tensors[key] - avg  # pseudo-gradient
        v = momentum * state.momentum.get(key, torch.zeros_like(delta)) + delta
        velocity[key] = v
        new[key] = state.tensors[key] - server_lr * v
    return ServerState(state.round + 1, new, velocity)


def add_proximal_term(params: Mapping[str, nn.Parameter], anchor: Mapping[str, torch.Tensor], mu: float) -> list[Any]:
    """FedProx on the client: each gradient gets mu (w - w_global), the gradient of mu/2 |w - w_global|^2.
    Returns the hook handles (remove them when the round ends)."""
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}")
    handles = []
    for name, p in params.items():
        w0 = anchor[name].to(p.device, p.dtype)
        handles.append(p.register_hook(lambda g, p=p, w0=w0: g + mu * (p.detach() - w0)))
    return handles


def save_checkpoint(folder: Path, state: ServerState, meta: Mapping[str, Any]) -> None:
    tensors = {f"global.{k}": v.contiguous() for k, v in state.tensors.items()}
    tensors |= {f"momentum.{k}": v.contiguous() for k, v in state.momentum.items()}
    with atomic_dir(Path(folder), overwrite=True) as tmp:
        if tensors:
            save_file(tensors, str(tmp / STATE), metadata={"format": "flexmore-flex-global"})
        (tmp / META).write_text(json.dumps(dict(meta) | {"round": state.round}, indent=2) + "\n")


def load_checkpoint(folder: Path) -> tuple[ServerState, dict[str, Any]] | None:
    """The saved state, or None if `folder` holds none (a fresh run)."""
    folder = Path(folder)
    if not (folder / META).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    raw = load_file(str(folder / STATE)) if (folder / STATE).is_file() else {}
    tensors = {k[len("global.") :]: v for k, v in raw.items() if k.startswith("global.")}
    momentum = {k[len("momentum.") :]: v for k, v in raw.items() if k.startswith("momentum.")}
    return ServerState(int(meta["round"]), tensors, momentum), meta
