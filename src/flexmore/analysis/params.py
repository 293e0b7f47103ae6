"""Parameter and FLOP accounting of a FlexMoRE mixture, from a config alone.

Parameters are counted on the meta device from `FlexMoReForCausalLM` itself, so the accounting and
the model cannot disagree; no weight is read.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flexmore.mixture import FlexMoReConfig, FlexMoReForCausalLM

_FULL = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LOW_RANK = re.compile(r"\.mlp\.experts\.low_rank\.(\d+)\.")
MAX_SUBSETS = 200_000


def parse_ranks(text: str) -> list[int | None]:
    """`full,64,128` -> [None, 64, 128]."""
    ranks: list[int | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("full", "dense", "none"):
            ranks.append(None)
        elif item.isdigit() and int(item) >= 1:
            ranks.append(int(item))
        else:
            raise ValueError(f"expert ranks: {item!r} is neither 'full' nor a positive integer")
    if len(ranks) < 1:
        raise ValueError("expert ranks: give at least one expert")
    return ranks


@dataclass(frozen=True)
class ParamReport:
    total: int
    non_expert: int
    experts: list[int]  # one entry per expert, in expert order
    expert_ranks: list[int | None]
    active: int
    # per-token multiply-adds x 2 of the MoE blocks (router + experts), all layers
    flexolmo_ffn_flops: int  # the same mixture with every expert full, K active
    flexmore_ffn_flops_min: int  # cheapest choice of K routed experts, shared-base forward
    flexmore_ffn_flops_max: int  # most expensive choice

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mixture_config(base: dict[str, Any], ranks: list[int | None], active: int | None = None) -> FlexMoReConfig:
    """A FlexMoRE config with the dimensions of `base` (a FlexOlmo config dict) and these experts."""
    keep = {k: v for k, v in base.items() if not k.startswith("_") and k not in _DROP}
    keep["num_experts"] = len(ranks)
    if active is not None:
        keep["num_experts_per_tok"] = active
    keep["num_experts_per_tok"] = min(keep.get("num_experts_per_tok", 5), len(ranks))
    keep["expert_ranks"] = ranks
    return FlexMoReConfig(**keep)


_DROP = {
    "model_type",
    "architectures",
    "transformers_version",
    "expert_names",
    "expert_bases",
    "expert_ranks",
    "active_experts",
    "dtype",
    "torch_dtype",
}


def count(config: FlexMoReConfig) -> ParamReport:
    with torch.device("meta"):
        model = FlexMoReForCausalLM(config)
    E = config.num_experts
    ranks = config.ranks
    full = config.full_experts
    experts = [0] * E
    non_expert = 0
    for name, p in model.named_parameters():
        if _FULL.search(name):
            for e in full:  # fused (F, ...) tensors hold the full experts in order
                experts[e] += p.numel() // len(full)
        elif m := _LOW_RANK.search(name):
            experts[int(m.group(1))] += p.numel()
        else:
            non_expert += p.numel()
    K = config.num_experts_per_tok
    lo, hi = _flexmore_flops(config, K)
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    router = 2 * E * H
    return ParamReport(
        total=non_expert + sum(experts),
        non_expert=non_expert,
        experts=experts,
        expert_ranks=ranks,
        active=K,
        flexolmo_ffn_flops=L * (router + K * 6 * H * I),
        flexmore_ffn_flops_min=lo,
        flexmore_ffn_flops_max=hi,
    )


def _flexmore_flops(config: FlexMoReConfig, K: int) -> tuple[int, int]:
    """Shared-base forward: each full expert in play once (base gate/up/down), plus every low-rank
    term along each routed expert's chain (2 r (d_in + d_out) per projection)."""
    E, H, I, L = config.num_experts, config.hidden_size, config.intermediate_size, config.num_hidden_layers
    if math.comb(E, K) > MAX_SUBSETS:
        raise ValueError(f"too many expert subsets to enumerate (C({E},{K}) > {MAX_SUBSETS})")
    rank = [r or 0 for r in config.ranks]
    low = [sum(6 * rank[c] * (H + I) for c in config.chain(e)) for e in range(E)]  # per routed expert
    roots = [config.root(e) for e in range(E)]
    costs = [
        2 * E * H + len({roots[e] for e in subset}) * 6 * H * I + sum(low[e] for e in subset)
        for subset in itertools.combinations(range(E), K)
    ]
    return L * min(costs), L * max(costs)


def dims_config(hidden_size: int, intermediate_size: int, num_layers: int) -> dict[str, Any]:
    """A minimal base config with only the dimensions that size an expert (for `expert_params` when all
    that is known is an expert folder's expert.json); attention is shrunk to one head."""
    return {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
    }


def expert_params(base: dict[str, Any], ranks: list[int | None]) -> list[int]:
    """Parameters that one expert adds to a mixture at each of `ranks` (None: a full, dense expert),
    router row excluded, counted like `count` from one mixture on the meta device."""
    if not ranks:
        return []
    report = count(mixture_config(base, [None, *ranks], active=1))
    return report.experts[1:]
