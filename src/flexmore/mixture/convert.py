"""Build FlexMoRE models from in-memory tensors, and export them dense to stock FlexOlmo.

Pure functions: inputs are never modified and outputs own their tensors (copies). Models are built on
the meta device and filled with `load_state_dict(assign=True)`, so no random init is spent on weights
that are overwritten and the tensors keep the source dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoRotaryEmbedding

from flexmore.mixture.config import FlexMoReConfig
from flexmore.mixture.experts import PROJECTIONS
from flexmore.mixture.modeling import FlexMoReForCausalLM

_FLEXMORE_FIELDS = ("expert_ranks", "expert_names", "expert_bases", "router_bias", "active_experts", "forward_impl")
_DROP = ("model_type", "architectures", "transformers_version", "_name_or_path")
_MOE = (".mlp.gate.", ".mlp.experts.")


@dataclass(frozen=True)
class ExpertParts:
    """One expert to add to a public model, from in-memory tensors.

    router: (L, H), this expert's row of every layer's router.
    factors: {(layer, projection): (lora_A (R, d_in), lora_B (d_out, R))} for a low-rank expert; with
        `rank` < R the prefix is used (factors ordered by singular value, docs/formats.md).
    dense: {(layer, projection): W (d_out, d_in)} for a full expert instead.
    base: the expert (index in the composed mixture, 0 = public) a low-rank expert adds its delta to.
    """

    name: str
    router: torch.Tensor
    factors: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None
    dense: Mapping[tuple[int, str], torch.Tensor] | None = None
    rank: int | None = None
    base: int = 0

    def __post_init__(self) -> None:
        if (self.factors is None) == (self.dense is None):
            raise ValueError(f"expert {self.name!r}: give exactly one of factors (low-rank) or dense (full)")

    def stored_rank(self) -> int | None:
        if self.factors is None:
            return None
        stored = {A.shape[0] for A, _ in self.factors.values()}
        if len(stored) != 1:
            raise ValueError(f"expert {self.name!r}: factors have different ranks {sorted(stored)}")
        R = stored.pop()
        if self.rank is not None and not 1 <= self.rank <= R:
            raise ValueError(f"expert {self.name!r}: rank {self.rank} outside [1, {R}] (the stored rank)")
        return R if self.rank is None else self.rank


def _config_dict(config: PreTrainedConfig, drop: Sequence[str] = ()) -> dict[str, Any]:
    out = {k: v for k, v in config.to_dict().items() if k not in (*_DROP, *drop)}
    out["attn_implementation"] = config._attn_implementation
    return out


def _assemble(model_cls: type[PreTrainedModel], config: PreTrainedConfig, state: dict[str, torch.Tensor]) -> Any:
    """A model of `model_cls` holding exactly `state` (strict: every parameter, no extra)."""
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in a state dict: rebuild the rotary frequencies off the meta device.
    device = state["model.embed_tokens.weight"].device
    model.model.rotary_emb = FlexOlmoRotaryEmbedding(config=cast(FlexOlmoConfig, config)).to(device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _non_moe(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not any(m in k for m in _MOE)}


def from_flexolmo(model: FlexOlmoForCausalLM, names: Sequence[str] | None = None) -> FlexMoReForCausalLM:
    """A FlexMoRE with every expert of a stock FlexOlmo model, all full; same parameter names, copied."""
    cfg = FlexMoReConfig(**_config_dict(model.config), expert_names=list(names) if names is not None else None)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = _assemble(FlexMoReForCausalLM, cfg, state)
    out.generation_config = model.generation_config
    return out.train(model.training)


def compose_low_rank(
    public: FlexOlmoForCausalLM,
    experts: Sequence[ExpertParts],
    public_name: str = "public",
    top_k: int | None = None,
) -> FlexMoReForCausalLM:
    """Expert 0 of `public` (and its non-expert tensors) plus `experts`, in that order (paper eq. 7)."""
    pc = public.config
    L, H, I = pc.num_hidden_layers, pc.hidden_size, pc.intermediate_size
    E = 1 + len(experts)
    ranks = [None, *(p.stored_rank() for p in experts)]
    k = min(pc.num_experts_per_tok, E) if top_k is None else top_k
    cfg = FlexMoReConfig(
        **_config_dict(pc, drop=("num_experts", "num_experts_per_tok")),
        num_experts=E,
        num_experts_per_tok=k,
        expert_ranks=ranks,
        expert_names=[public_name, *(p.name for p in experts)],
        expert_bases=[None, *(p.base if p.factors is not None else None for p in experts)],
    )
    dtype = public.model.embed_tokens.weight.dtype
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}

    def get(p: ExpertParts, table: Mapping[tuple[int, str], Any], layer: int, proj: str) -> Any:
        if (layer, proj) not in table:
            raise ValueError(f"expert {p.name!r}: no tensors for layer {layer} {proj}")
        return table[(layer, proj)]

    state = _non_moe(public)
    for layer in range(L):
        pre = f"model.layers.{layer}.mlp"
        ref = public.model.layers[layer].mlp
        rows = [ref.gate.weight[0].detach()]
        for p in experts:
            if tuple(p.router.shape) != (L, H):
                raise ValueError(
                    f"expert {p.name!r}: router must be (layers, hidden)={(L, H)}, got {tuple(p.router.shape)}"
                )
            rows.append(p.router[layer])
        state[f"{pre}.gate.weight"] = torch.stack(rows).to(dtype)  # (E, H)
        gate_up = [ref.experts.gate_up_proj[0].detach()]  # (2I, H) per full expert
        down = [ref.experts.down_proj[0].detach()]  # (H, I)
        for e, p in enumerate(experts, start=1):
            if p.dense is not None:
                w = {proj: get(p, p.dense, layer, proj) for proj in PROJECTIONS}
                for proj in PROJECTIONS:
                    if tuple(w[proj].shape) != shapes[proj]:
                        raise ValueError(
                            f"expert {p.name!r}: layer {layer} {proj} is {tuple(w[proj].shape)}, want {shapes[proj]}"
                        )
                gate_up.append(torch.cat([w["gate_proj"], w["up_proj"]]))
                down.append(w["down_proj"])
                continue
            assert p.factors is not None
            r = ranks[e]
            for proj in PROJECTIONS:
                A, B = get(p, p.factors, layer, proj)
                d_out, d_in = shapes[proj]
                if A.shape[1] != d_in or B.shape[0] != d_out or B.shape[1] != A.shape[0]:
                    raise ValueError(
                        f"expert {p.name!r}: layer {layer} {proj} factors A {tuple(A.shape)}, B {tuple(B.shape)} "
                        f"do not fit ({d_out}, {d_in})"
                    )
                state[f"{pre}.experts.low_rank.{e}.{proj}.lora_A"] = A[:r].to(dtype).clone()  # (r, d_in)
                state[f"{pre}.experts.low_rank.{e}.{proj}.lora_B"] = B[:, :r].to(dtype).clone()  # (d_out, r)
        state[f"{pre}.experts.gate_up_proj"] = torch.stack(gate_up).to(dtype)  # (F, 2I, H)
        state[f"{pre}.experts.down_proj"] = torch.stack(down).to(dtype)  # (F, H, I)
    out = _assemble(FlexMoReForCausalLM, cfg, state)
    out.generation_config = public.generation_config
    return out.train(public.training)


@torch.no_grad()
def to_flexolmo(model: FlexMoReForCausalLM) -> FlexOlmoForCausalLM:
    """Dense export to a stock FlexOlmoForCausalLM: each active expert materialised as its root plus
    every delta along its chain; router rows of the active experts; top-k capped at their number."""
    cfg = model.config
    active = cfg.active_indices()
    fo = FlexOlmoConfig(
        **_config_dict(cfg, drop=(*_FLEXMORE_FIELDS, "num_experts", "num_experts_per_tok")),
        num_experts=len(active),
        num_experts_per_tok=min(cfg.num_experts_per_tok, len(active)),
    )
    state = _non_moe(model)
    for layer, decoder in enumerate(model.model.layers):
        pre = f"model.layers.{layer}.mlp"
        gate, experts = decoder.mlp.gate, decoder.mlp.experts
        if gate.bias is not None and bool((gate.bias[1:] < 0).any()):
            raise ValueError(
                f"layer {layer}: router_bias has negative entries; stock FlexOlmo has no router bias to hold them"
            )
        state[f"{pre}.gate.weight"] = gate.weight[active].clone()  # (E', H)
        dense = [experts.materialize(e) for e in active]
        state[f"{pre}.experts.gate_up_proj"] = torch.stack([g for g, _ in dense])  # (E', 2I, H)
        state[f"{pre}.experts.down_proj"] = torch.stack([d for _, d in dense])  # (E', H, I)
    out = _assemble(FlexOlmoForCausalLM, fo, state)
    out.generation_config = model.generation_config
    return out.train(model.training)


__all__ = ["ExpertParts", "compose_low_rank", "from_flexolmo", "to_flexolmo"]
