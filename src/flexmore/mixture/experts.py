"""The experts of one FlexMoRE layer: fused full experts plus low-rank experts.

Low-rank expert i on full root W0 is W0 + sum_c B_c A_c on each of gate_proj, up_proj, down_proj (c
along its chain of bases). The fast forward is `shared_base.py`; `_naive` materialises every routed
expert and runs stock FlexOlmo's loop, the reference the tests hold it to.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from flexmore.mixture.config import FlexMoReConfig
from flexmore.mixture.shared_base import shared_base_forward

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class LoRAFactors(nn.Module):
    """delta = lora_B @ lora_A, PEFT's names and shapes."""

    def __init__(self, rank: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(d_out, rank))  # (d_out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)  # (n, r) -> (n, d_out)

    def delta(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A  # (d_out, d_in)


class LowRankExpert(nn.Module):
    def __init__(self, rank: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = LoRAFactors(rank, hidden, intermediate)
        self.up_proj = LoRAFactors(rank, hidden, intermediate)
        self.down_proj = LoRAFactors(rank, intermediate, hidden)


class FlexMoReExperts(nn.Module):
    """`gate_up_proj` (F, 2I, H) and `down_proj` (F, H, I) hold the F full experts in expert order
    (FlexOlmo's fused layout); `low_rank.{e}` holds low-rank expert e (global expert index)."""

    def __init__(self, config: FlexMoReConfig) -> None:
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.num_experts = config.num_experts
        self.intermediate_dim = I
        self.full = config.full_experts
        self.slot = {e: s for s, e in enumerate(self.full)}  # expert index -> row of the fused tensors
        self.gate_up_proj = nn.Parameter(torch.empty(len(self.full), 2 * I, H))  # (F, 2I, H)
        self.down_proj = nn.Parameter(torch.empty(len(self.full), H, I))  # (F, H, I)
        self.low_rank = nn.ModuleDict(
            {str(e): LowRankExpert(r, H, I) for e, r in enumerate(config.ranks) if r is not None}
        )
        self.act_fn = ACT2FN[config.hidden_act]
        self.chains = [config.chain(e) for e in range(config.num_experts)]
        self.roots = [config.root(e) for e in range(config.num_experts)]
        # Each full expert with the low-rank experts whose chain ends at it (its "tree").
        self.trees = {r: [e for e in range(config.num_experts) if self.roots[e] == r] for r in self.full}
        self.forward_impl = config.forward_impl
        self.silu = config.hidden_act == "silu"
        # Token rows per chunk of the no-grad shared-base forward on CPU: (chunk, I) fp32 buffers of
        # ~1.5 MiB stay in L2/L3 (measured on a 2-core EPYC: 256-512 rows best at I = 2752).
        self.chunk_tokens = max(64, 2**20 // I)
        self._checked_hook: object = None

    def expert(self, e: int) -> LowRankExpert:
        return cast(LowRankExpert, self.low_rank[str(e)])

    def lora(self, x: torch.Tensor, e: int, projection: str) -> torch.Tensor:
        """sum over e's chain of B_c (A_c x): the low-rank part of expert e's projection."""
        out: torch.Tensor | None = None
        for c in self.chains[e]:
            term = getattr(self.expert(c), projection)(x)  # (n, d_out)
            out = term if out is None else out + term
        assert out is not None, f"expert {e} is full"
        return out

    def materialize(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e as dense (gate_up (2I, H), down (H, I)): root + every delta along its chain."""
        I = self.intermediate_dim
        s = self.slot[self.roots[e]]
        gate, up, down = self.gate_up_proj[s, :I], self.gate_up_proj[s, I:], self.down_proj[s]
        for c in self.chains[e]:
            m = self.expert(c)
            gate = gate + m.gate_proj.delta()  # (I, H)
            up = up + m.up_proj.delta()  # (I, H)
            down = down + m.down_proj.delta()  # (H, I)
        return torch.cat([gate, up]), down

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """x (T, H), top_k_index / top_k_weights (T, k) -> (T, H)."""
        hook = getattr(self, "_hf_hook", None)  # accelerate's, under a multi-device or offloading device_map
        if hook is not None and hook is not self._checked_hook:
            self._check_loaded()  # once per hook: offloaded factors are on "meta" whenever they are not loaded
            self._checked_hook = hook
        if self.forward_impl == "naive":
            return self._naive(x, top_k_index, top_k_weights)
        return shared_base_forward(self, x, top_k_index, top_k_weights)

    def _check_loaded(self) -> None:
        if any(p.is_meta for p in self.low_rank.parameters()):
            raise RuntimeError(
                "low-rank expert weights are on the meta device: accelerate offloaded them with hooks that "
                "load them only around each submodule's own forward. Load with FlexMoReForCausalLM."
                "from_pretrained(..., device_map=...) or call flexmore.mixture.gather_offloaded_experts(model)"
            )

    def routes(
        self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Per expert: how many tokens, which tokens (ascending) and their routing weights. One sort,
        no per-token loop."""
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)  # (T k,)
        order = torch.argsort(flat, stable=True)  # (T k,) stable: tokens stay ascending per expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync, as stock's nonzero
        tokens = torch.split(order // k, counts)  # per expert (n_e,)
        weights = torch.split(top_k_weights.reshape(-1)[order], counts)  # per expert (n_e,)
        return counts, list(tokens), list(weights)

    def _naive(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Reference: materialise each routed expert and run stock FlexOlmo's per-expert loop."""
        counts, tokens, weights = self.routes(top_k_index, top_k_weights)
        out = torch.zeros_like(x)  # (T, H)
        for e in range(self.num_experts):
            if counts[e] == 0:
                continue
            gate_up, down = self.materialize(e)  # (2I, H), (H, I)
            gate, up = F.linear(x[tokens[e]], gate_up).chunk(2, dim=-1)  # (n_e, I) each
            y = F.linear(self.act_fn(gate) * up, down) * weights[e].unsqueeze(-1)  # (n_e, H)
            out.index_add_(0, tokens[e], y.to(out.dtype))
        return out


__all__ = ["PROJECTIONS", "FlexMoReExperts", "LoRAFactors", "LowRankExpert"]
