"""The grafted expert and its adaptive sigmoid gate, added to a frozen MoE block:

    y = MoE(x) + sum_k sigmoid(w_k . x + b_k) * E_k(x)

The gate is a per-token scalar, the form of Qwen's shared-expert gate (`sigmoid(shared_expert_gate(x))`)
plus a bias; the paper's exact form is not public (docs/flex.md). `w` starts at zero and `b` at
`gate_bias`, so the graft starts nearly closed and the model nearly the pretrained one; `b = -inf`
closes it exactly (sigmoid(-inf) = 0), which is how the tests check that grafting alone changes nothing.
Without a gate (the paper's ablation) the graft's output is added at full weight.

The branch is registered as a submodule `flex_graft` of the MoE block and added by a forward hook, so
the block, its parameter names and whatever it returns (a tensor, or a tuple whose first element is the
hidden states) are untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import act_fn, expert_weights, moe_blocks
from .graft import GraftChoice

BRANCH = "flex_graft"


class GraftExpert(nn.Module):
    """A SwiGLU expert of `width` channels, copied from kept channels of a pretrained expert."""

    def __init__(self, hidden: int, width: int, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.zeros(width, hidden))  # (W, H)
        self.up_proj = nn.Parameter(torch.zeros(width, hidden))  # (W, H)
        self.down_proj = nn.Parameter(torch.zeros(hidden, width))  # (H, W)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(x @ self.gate_proj.T) * (x @ self.up_proj.T)  # (..., W)
        return h @ self.down_proj.T  # (..., H)


class SigmoidGate(nn.Module):
    def __init__(self, hidden: int, bias: float) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(x))  # (..., 1)


class GraftBranch(nn.Module):
    def __init__(self, experts: list[GraftExpert], gates: list[SigmoidGate] | None) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gates = nn.ModuleList(gates) if gates is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)  # (B, T, H)
        for k, expert in enumerate(self.experts):
            y = expert(x)  # (B, T, H)
            if self.gates is not None:
                g = self.gates[k](x)  # (B, T, 1)
                # A closed gate contributes exactly nothing (0 * y would still be NaN for an inf y).
                y = torch.where(g > 0, g * y, torch.zeros_like(y))
            out = out + y
        return out


def _add_branch(block: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    branch = getattr(block, BRANCH)
    extra = branch(args[0]).to(args[0].dtype)  # (B, T, H)
    if isinstance(output, tuple):  # keep whatever else the block returns (e.g. router logits)
        return (output[0] + extra.reshape(output[0].shape), *output[1:])
    return output + extra.reshape(output.shape)


def attach_grafts(
    model: nn.Module, choices: dict[int, list[GraftChoice]], *, gated: bool = True, gate_bias: float = -2.0
) -> dict[int, GraftBranch]:
    """Copy each chosen expert's kept channels into a new graft on its block and hook it in."""
    branches: dict[int, GraftBranch] = {}
    for layer, block in moe_blocks(model).items():
        if hasattr(block, BRANCH):
            raise ValueError(f"layer {layer} already has a graft")
        experts, gates = [], []
        for c in choices[layer]:
            gate_w, up_w, down_w = (w.detach() for w in expert_weights(block, c.expert))
            idx = torch.tensor(c.channels, dtype=torch.long)
            H = gate_w.shape[1]
            g = GraftExpert(H, len(c.channels), act_fn(block))
            with torch.no_grad():
                g.gate_proj.copy_(gate_w[idx])  # (W, H)
                g.up_proj.copy_(up_w[idx])  # (W, H)
                g.down_proj.copy_(down_w[:, idx])  # (H, W)
            experts.append(g.to(gate_w.device))
            gates.append(SigmoidGate(H, gate_bias).to(gate_w.device))
        branch = GraftBranch(experts, gates if gated else None)
        block.add_module(BRANCH, branch)
        block.register_forward_hook(_add_branch)
        branches[layer] = branch
    return branches


def grafts_of(model: nn.Module) -> dict[int, GraftBranch]:
    return {i: getattr(b, BRANCH) for i, b in moe_blocks(model).items() if hasattr(b, BRANCH)}


def graft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The personal tensors, keyed `layers.{L}.{experts|gates}.{k}.{name}` (independent of any wrapper)."""
    return {
        f"layers.{i}.{name}": p.detach().cpu().contiguous()
        for i, branch in grafts_of(model).items()
        for name, p in branch.named_parameters()
    }


def load_graft_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    mine = graft_state(model)
    if set(mine) != set(state):
        raise ValueError(
            f"graft state keys differ: missing {sorted(set(mine) - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - set(mine))[:3]}"
        )
    with torch.no_grad():
        for i, branch in grafts_of(model).items():
            for name, p in branch.named_parameters():
                p.copy_(state[f"layers.{i}.{name}"])
