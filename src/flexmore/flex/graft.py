"""Expert grafting, one-shot per client and MoE layer (FLEx, "expert grafting").

1. `record_blocks`: run the client's calibration data through the frozen model and keep every MoE
   block's input X (N, H) and output Z (N, H), token by token.
2. `select_experts`: for each pretrained expert e, its output Y_e = E_e(X) and the optimal scalar weight
   a_e = <Y_e, Z> / <Y_e, Y_e>; the reconstruction error is ||Z - a_e Y_e||^2. The expert(s) with the
   least error are chosen (k > 1: the k best, the paper's costly extension).
3. `prune_channels`: keep `width` of the I intermediate channels. The expert's output is a sum over
   channels, Y = sum_j h_j(X) d_j^T with h_j = act(g_j x) * (u_j x) and d_j the j-th column of down_proj,
   so removing channel j changes the residual R = Z - a Y by a h_j d_j^T and raises the error by
   2a <R, h_j d_j^T> + a^2 |h_j|^2 |d_j|^2. Channels are removed greedily, cheapest first, updating R.
   At full width nothing is removed: the graft is the copied expert, exactly.

The grafted expert is the copy (unscaled); `alpha` is recorded for reference only: the gate and training
decide how much of it to add.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .adapters import act_fn, expert_weights, moe_blocks


@dataclass(frozen=True)
class GraftChoice:
    layer: int
    expert: int  # the pretrained expert copied
    alpha: float  # its optimal scalar weight on the calibration data
    error: float  # ||Z - alpha Y||^2 / ||Z||^2 before pruning
    pruned_error: float  # ... after pruning (relative, same normalisation)
    channels: tuple[int, ...]  # kept intermediate channels, ascending

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"channels": list(self.channels)}


@torch.no_grad()
def record_blocks(model: nn.Module, batches: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (X (N, H), Z (N, H))} of every MoE block over the calibration batches (each (B, T))."""
    blocks = moe_blocks(model)
    seen: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {i: ([], []) for i in blocks}
    handles = []
    for i, block in blocks.items():

        def hook(_mod: nn.Module, args: tuple[Any, ...], out: Any, i: int = i) -> None:
            x = args[0]
            z = out[0] if isinstance(out, tuple) else out
            seen[i][0].append(x.reshape(-1, x.shape[-1]).float().cpu())  # (B*T, H)
            seen[i][1].append(z.reshape(-1, z.shape[-1]).float().cpu())  # (B*T, H)

        handles.append(block.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: (torch.cat(xs), torch.cat(zs)) for i, (xs, zs) in seen.items()}


def channel_outputs(block: Any, expert: int, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (N, I), down (H, I)) of one expert: its output is h @ down.T."""
    gate, up, down = (w.detach().float() for w in expert_weights(block, expert))
    h = act_fn(block)(X @ gate.T) * (X @ up.T)  # (N, I)
    return h, down


def select_experts(block: Any, X: torch.Tensor, Z: torch.Tensor, k: int = 1) -> list[tuple[int, float, float]]:
    """The k experts that best reconstruct Z from X: [(expert, alpha, relative error)], best first."""
    n_experts = block.experts.gate_up_proj.shape[0]
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must be in [1, {n_experts}] (the block's experts), got {k}")
    zz = float((Z * Z).sum()) or 1.0
    scored = []
    for e in range(n_experts):
        h, down = channel_outputs(block, e, X)
        Y = h @ down.T  # (N, H)
        yy = float((Y * Y).sum())
        alpha = float((Y * Z).sum()) / yy if yy > 0 else 0.0
        err = float(((Z - alpha * Y) ** 2).sum()) / zz
        scored.append((err, e, alpha))
    scored.sort()
    return [(e, alpha, err) for err, e, alpha in scored[:k]]


def prune_channels(h: torch.Tensor, down: torch.Tensor, Z: torch.Tensor, alpha: float, width: int) -> list[int]:
    """Greedy: remove I - width channels, each time the one whose removal raises ||Z - a Y||^2 least."""
    I = h.shape[1]
    if not 1 <= width <= I:
        raise ValueError(f"width must be in [1, {I}] (the expert's intermediate size), got {width}")
    keep = torch.ones(I, dtype=torch.bool)
    R = Z - alpha * (h @ down.T)  # (N, H) residual with every channel
    norms = (h * h).sum(0) * (down * down).sum(0)  # (I,) |h_j|^2 |d_j|^2
    for _ in range(I - width):
        cross = ((R @ down) * h).sum(0)  # (I,) <R, h_j d_j^T>
        cost = 2 * alpha * cross + alpha * alpha * norms  # (I,)
        cost[~keep] = float("inf")
        j = int(cost.argmin())
        keep[j] = False
        R = R + alpha * h[:, j : j + 1] * down[:, j][None]  # (N, H) channel j no longer subtracted
    return [int(j) for j in keep.nonzero().flatten()]


@torch.no_grad()
def choose_grafts(
    model: nn.Module, calibration: dict[int, tuple[torch.Tensor, torch.Tensor]], width: int, k: int = 1
) -> dict[int, list[GraftChoice]]:
    """{layer: k choices}, each the selected expert pruned to `width` channels."""
    out: dict[int, list[GraftChoice]] = {}
    for layer, block in moe_blocks(model).items():
        X, Z = calibration[layer]
        zz = float((Z * Z).sum()) or 1.0
        choices = []
        for e, alpha, err in select_experts(block, X, Z, k):
            h, down = channel_outputs(block, e, X)
            channels = prune_channels(h, down, Z, alpha, width)
            Y = h[:, channels] @ down[:, channels].T  # (N, H)
            pruned = float(((Z - alpha * Y) ** 2).sum()) / zz
            choices.append(GraftChoice(layer, e, alpha, err, pruned, tuple(channels)))
        out[layer] = choices
    return out
