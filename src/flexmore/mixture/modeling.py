"""`FlexMoReForCausalLM`: FlexOlmo with rank-heterogeneous experts, as a `transformers` model.

Attention, norms, rotary embedding, the decoder/model forward and generation are FlexOlmo's; only
the MoE block differs (router with optional bias and opt-out mask, `FlexMoReExperts`). Parameter
names follow docs/formats.md ("FlexMoRE checkpoint"); nothing else is renamed, and no transformers
weight-conversion mapping is registered for model_type "flexmore", so disk names equal memory names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.flex_olmo.modeling_flex_olmo import (
    FlexOlmoAttention,
    FlexOlmoDecoderLayer,
    FlexOlmoForCausalLM,
    FlexOlmoModel,
    FlexOlmoPreTrainedModel,
    FlexOlmoRMSNorm,
    FlexOlmoRotaryEmbedding,
)
from transformers.utils.output_capturing import OutputRecorder

from flexmore.mixture.config import FORWARD_IMPLS, FlexMoReConfig
from flexmore.mixture.experts import FlexMoReExperts, LoRAFactors

if TYPE_CHECKING:
    from flexmore.mixture.convert import ExpertParts


class FlexMoReRouter(nn.Module):
    """FlexOlmo's router: softmax over all experts in fp32, top-k, renormalised only if norm_topk_prob.
    Opted-out experts get logit -inf before the softmax, so the result is the mixture without them."""

    def __init__(self, config: FlexMoReConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))  # (E, H)
        self.bias = nn.Parameter(torch.zeros(self.num_experts)) if config.router_bias else None  # (E,)
        self.set_active(config.active_indices())

    def set_active(self, active: Sequence[int]) -> None:
        self.inactive = [e for e in range(self.num_experts) if e not in set(active)]
        self._inactive_index: torch.Tensor | None = None
        # Fewer active experts than top_k: route to all of them, exactly the smaller mixture.
        self.k = min(self.top_k, self.num_experts - len(self.inactive))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)  # (T, H)
        router_logits = F.linear(hidden_states, self.weight)  # (T, E)
        if self.bias is not None:
            # Original FlexOlmo: a learnable non-positive bias for every expert but the public one (0).
            bias = F.pad(self.bias[1:].clamp(max=0), (1, 0))  # (E,), 0 for the public expert
            router_logits = router_logits + bias.to(router_logits.dtype)
        if self.inactive:
            index = self._inactive_index
            if index is None or index.device != router_logits.device:
                index = self._inactive_index = torch.tensor(self.inactive, device=router_logits.device)
            router_logits = router_logits.index_fill(1, index, float("-inf"))
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)  # (T, E)
        top_value, top_index = torch.topk(router_probs, self.k, dim=-1)  # (T, k)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index


class FlexMoReSparseMoeBlock(nn.Module):
    def __init__(self, config: FlexMoReConfig) -> None:
        super().__init__()
        self.gate = FlexMoReRouter(config)
        self.experts = FlexMoReExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)  # (T, H)
        _, top_k_weights, top_k_index = self.gate(hidden_states)  # (T, k) each
        out = self.experts(hidden_states, top_k_index, top_k_weights)  # (T, H)
        return out.reshape(batch_size, sequence_length, hidden_dim)


class FlexMoReDecoderLayer(FlexOlmoDecoderLayer):
    """FlexOlmo's post-norm block and forward with our MoE block (built directly: no full experts
    are allocated only to be thrown away)."""

    def __init__(self, config: FlexMoReConfig, layer_idx: int) -> None:
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = FlexOlmoAttention(config=config, layer_idx=layer_idx)
        self.mlp = FlexMoReSparseMoeBlock(config)  # type: ignore[assignment]
        self.post_attention_layernorm = FlexOlmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = FlexOlmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class FlexMoRePreTrainedModel(FlexOlmoPreTrainedModel):
    config: FlexMoReConfig
    config_class = FlexMoReConfig
    _no_split_modules = ["FlexMoReDecoderLayer"]  # noqa: RUF012
    _can_compile_fullgraph = False  # routing reads per-expert token counts on the host
    _can_record_outputs = {  # noqa: RUF012
        "router_logits": OutputRecorder(FlexMoReRouter, index=0),
        "hidden_states": FlexMoReDecoderLayer,
        "attentions": FlexOlmoAttention,
    }

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(*args, **kwargs)
        gather_offloaded_experts(loaded[0] if isinstance(loaded, tuple) else loaded)  # (model, info)
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, FlexMoReExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, FlexMoReRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LoRAFactors):
            # LoRA's init: B = 0, so a new low-rank expert starts equal to its base.
            init.normal_(module.lora_A, mean=0.0, std=std)
            init.zeros_(module.lora_B)


def gather_offloaded_experts(model: nn.Module) -> None:
    """Let every offloaded `FlexMoReExperts` load all of its weights around its own forward.

    With a device_map that offloads to "cpu" or "disk", accelerate hooks each module that owns weights
    and loads them only around that module's own forward. The shared-base forward reads every low-rank
    expert's factors inside `FlexMoReExperts.forward`, so one hook there must load them all: accelerate's
    `preload_module_classes`, which transformers' `from_pretrained` does not pass."""
    hooked = [m for m in model.modules() if isinstance(m, FlexMoReExperts) and hasattr(m, "_hf_hook")]
    if not hooked:
        return  # not dispatched by accelerate (which may not be installed)
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_submodules

    for module in hooked:
        hook = module._hf_hook
        if not (isinstance(hook, AlignDevicesHook) and hook.offload):
            continue
        remove_hook_from_submodules(module)  # offloaded tensors stay on "meta"
        whole = AlignDevicesHook(
            execution_device=hook.execution_device,
            offload=True,
            io_same_device=hook.io_same_device,
            weights_map=hook.weights_map,  # prefixed by this module's name: holds the submodules' tensors too
            offload_buffers=hook.offload_buffers,
            place_submodules=True,
            skip_keys=hook.skip_keys,
            tied_params_map=hook.tied_params_map,
        )
        add_hook_to_module(module, whole)


class FlexMoReModel(FlexMoRePreTrainedModel, FlexOlmoModel):
    def __init__(self, config: FlexMoReConfig) -> None:
        FlexMoRePreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([FlexMoReDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = FlexOlmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = FlexOlmoRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class FlexMoReForCausalLM(FlexMoRePreTrainedModel, FlexOlmoForCausalLM):
    def __init__(self, config: FlexMoReConfig) -> None:
        FlexMoRePreTrainedModel.__init__(self, config)
        self.model = FlexMoReModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def moe_blocks(self) -> list[FlexMoReSparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, FlexMoReSparseMoeBlock)]

    def set_active_experts(self, names: Sequence[str] | None) -> None:
        """Opt in/out at inference time: only these experts (by name) can be routed to; None = all.
        Equal to the mixture composed without the others (their logits are -inf before the softmax)."""
        active = None if names is None else list(names)
        self.config.active_experts = active
        self.config.check_experts()  # names exist, not empty
        indices = self.config.active_indices()
        for block in self.moe_blocks():
            block.gate.set_active(indices)

    def set_top_k(self, top_k: int) -> None:
        """Route each token to `top_k` experts from now on (capped at the number of active experts)."""
        if not 1 <= top_k <= self.config.num_experts:
            raise ValueError(f"num_experts_per_tok = {top_k}: expected [1, {self.config.num_experts}]")
        self.config.num_experts_per_tok = self.num_experts_per_tok = top_k
        for block in self.moe_blocks():
            block.gate.top_k = top_k
            block.gate.set_active(self.config.active_indices())

    def set_forward_mode(self, mode: str) -> None:
        """Forward mode: "shared_base" (fast, default) or "naive" (materialise W_base + B A per expert; reference)."""
        if mode not in FORWARD_IMPLS:
            raise ValueError(f"forward mode {mode!r}: expected one of {FORWARD_IMPLS}")
        self.config.forward_impl = mode
        for block in self.moe_blocks():
            block.experts.forward_impl = mode

    @classmethod
    def from_flexolmo(cls, model: FlexOlmoForCausalLM, names: Sequence[str] | None = None) -> FlexMoReForCausalLM:
        """Every expert of a stock FlexOlmo model, all full; the same parameters (copied)."""
        from flexmore.mixture.convert import from_flexolmo

        return from_flexolmo(model, names)

    @classmethod
    def compose(
        cls,
        public: FlexOlmoForCausalLM,
        experts: Sequence[ExpertParts],
        public_name: str = "public",
        top_k: int | None = None,
    ) -> FlexMoReForCausalLM:
        """Public expert 0 of `public` (with its non-expert tensors) plus in-memory low-rank experts."""
        from flexmore.mixture.convert import compose_low_rank

        return compose_low_rank(public, experts, public_name=public_name, top_k=top_k)

    def to_flexolmo(self) -> FlexOlmoForCausalLM:
        """Dense export: every active expert materialised (W_root + B A along its chain) into a stock
        FlexOlmoForCausalLM with the same router rows."""
        from flexmore.mixture.convert import to_flexolmo

        return to_flexolmo(self)


__all__ = [
    "FlexMoReDecoderLayer",
    "FlexMoReForCausalLM",
    "FlexMoReModel",
    "FlexMoRePreTrainedModel",
    "FlexMoReRouter",
    "FlexMoReSparseMoeBlock",
]
