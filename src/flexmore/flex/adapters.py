"""One adapter per `transformers` MoE family: where the MoE blocks are and what in them is an expert.

In transformers 5.x every supported family has the same in-memory layout, which is why one adapter
class with per-family names suffices:
    block.gate.weight            (E, H)      the router (a TopKRouter; its forward returns logits first)
    block.experts.gate_up_proj   (E, 2I, H)  fused SwiGLU input projections, gate rows first
    block.experts.down_proj      (E, H, I)
    block.shared_expert          (Qwen2-MoE only) an always-on SwiGLU MLP behind `shared_expert_gate`
and the MoE block is `model.layers[L].mlp` (Qwen2-MoE keeps a dense MLP on `mlp_only_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """A model whose family has no adapter, or whose MoE blocks are not where the adapter looks."""


@dataclass(frozen=True)
class MoEFamily:
    model_type: str
    block_class: str  # class name of the sparse MoE block
    num_experts_attr: str  # config attribute holding E
    shared_expert: tuple[str, ...] = ()  # submodule names of always-on experts (frozen like the routed ones)
    # PEFT's default LoRA targets for the family (peft.utils.constants): attention q and v
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    dense_mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # dense MLP layers outside MoE blocks


FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in (
        MoEFamily("qwen2_moe", "Qwen2MoeSparseMoeBlock", "num_experts", ("shared_expert", "shared_expert_gate")),
        MoEFamily("olmoe", "OlmoeSparseMoeBlock", "num_experts"),
        MoEFamily("mixtral", "MixtralSparseMoeBlock", "num_local_experts"),
        MoEFamily("flex_olmo", "FlexOlmoSparseMoeBlock", "num_experts"),
    )
}


def family_of(model: nn.Module) -> MoEFamily:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model family {model_type!r}: FLEx has adapters for {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[str(model_type)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers` of a *ForCausalLM (also under a PEFT wrapper)."""
    inner = model
    for _ in range(4):  # PeftModel -> LoraModel -> *ForCausalLM -> *Model
        if isinstance(getattr(inner, "layers", None), nn.ModuleList):
            return inner.layers  # type: ignore[return-value]
        nxt = getattr(inner, "base_model", None) if hasattr(inner, "peft_config") else getattr(inner, "model", None)
        if not isinstance(nxt, nn.Module):
            break
        inner = nxt
    raise UnsupportedModelError(f"{type(model).__name__}: no decoder layers found at model.layers")


def moe_blocks(model: nn.Module) -> dict[int, Any]:
    """{layer index: its sparse MoE block}; layers with a dense MLP are left out."""
    family = family_of(model)
    blocks = {
        i: layer.mlp
        for i, layer in enumerate(decoder_layers(model))
        if type(getattr(layer, "mlp", None)).__name__ == family.block_class
    }
    if not blocks:
        raise UnsupportedModelError(f"{family.model_type}: no {family.block_class} found in model.layers[*].mlp")
    return blocks


def num_experts(model: nn.Module) -> int:
    return int(getattr(model.config, family_of(model).num_experts_attr))


def expert_weights(block: Any, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_proj (I, H), up_proj (I, H), down_proj (H, I)) of one routed expert, as views."""
    experts = block.experts
    gate_up = experts.gate_up_proj[expert]  # (2I, H)
    I = gate_up.shape[0] // 2
    return gate_up[:I], gate_up[I:], experts.down_proj[expert]  # (I, H), (I, H), (H, I)


def act_fn(block: Any) -> nn.Module:
    act: nn.Module = block.experts.act_fn
    return act


def frozen_names(model: nn.Module) -> list[str]:
    """Parameter names of every pretrained expert and router (routed and shared): FLEx never changes them."""
    family = family_of(model)
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if "mlp" not in parts:
            continue
        tail = parts[parts.index("mlp") + 1 :]
        if (
            tail
            and tail[0] in ("gate", "experts", *family.shared_expert)
            and "lora_A" not in name
            and "lora_B" not in name
        ):
            names.append(name)
    return names
