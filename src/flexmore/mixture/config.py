"""`FlexMoReConfig`: a FlexOlmo config whose experts may be low-rank (paper section 3.1).

Expert i is full (`expert_ranks[i] is None`) or low-rank: `W_base(i) + B_i A_i` on each of gate_proj,
up_proj and down_proj, with its own rank. `expert_bases[i]` names the expert it adds its delta to; a
chain of bases must end at a full expert (its "root"). Expert 0 is the public expert (FlexOlmo): it
never gets the learnable non-positive router bias.
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import FlexOlmoConfig

FORWARD_IMPLS = ("shared_base", "naive")


@strict
class FlexMoReConfig(FlexOlmoConfig):
    model_type = "flexmore"
    # Our experts are not FlexOlmo's fused grouped-GEMM experts: only attention keeps a TP plan.
    base_model_tp_plan: ClassVar = {k: v for k, v in FlexOlmoConfig.base_model_tp_plan.items() if ".mlp." not in k}
    base_model_ep_plan: ClassVar = {}

    expert_ranks: list[int | None] | None = None  # None: every expert full
    expert_names: list[str] | None = None  # None: expert_0, expert_1, ...
    expert_bases: list[int | None] | None = None  # None: every low-rank expert sits on expert 0
    router_bias: bool = False  # original FlexOlmo's learnable bias, min(b, 0), for non-public experts
    active_experts: list[str] | None = None  # opt-in/opt-out by name; None: all
    forward_impl: str = "shared_base"  # "naive" materialises W_base + B A per expert (reference path)

    def __post_init__(self, **kwargs: Any) -> None:
        E = self.num_experts
        if self.expert_ranks is None:
            self.expert_ranks = [None] * E
        if self.expert_names is None:
            self.expert_names = [f"expert_{i}" for i in range(E)]
        if self.expert_bases is None:
            self.expert_bases = [None if r is None else 0 for r in self.expert_ranks]
        super().__post_init__(**kwargs)
        # ValueError here (not only a strict `validate_*`, whose error is no ValueError) so callers
        # can catch a bad mixture the usual way.
        self.check_experts()

    def validate_flexmore_experts(self) -> None:
        """Run again by `save_pretrained` (strict class validator)."""
        self.check_experts()

    def check_experts(self) -> None:
        E = self.num_experts
        ranks, names, bases = self.ranks, self.names, self.bases
        for field, value in (("expert_ranks", ranks), ("expert_names", names), ("expert_bases", bases)):
            if len(value) != E:
                raise ValueError(f"{field} must have num_experts={E} entries, got {len(value)}: {value}")
        limit = min(self.hidden_size, self.intermediate_size)
        for i, r in enumerate(ranks):
            if r is not None and not 1 <= r <= limit:
                raise ValueError(
                    f"expert_ranks[{i}] = {r}: a rank must be in [1, min(hidden_size, intermediate_size)={limit}]"
                )
        if all(r is not None for r in ranks):
            raise ValueError(f"expert_ranks = {ranks}: at least one expert must be full (None)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert_names must be unique; repeated: {dupes}")
        for i, (r, b) in enumerate(zip(ranks, bases, strict=True)):
            if r is None and b is not None:
                raise ValueError(f"expert_bases[{i}] = {b}: expert {i} is full, its base must be None")
            if r is not None and (b is None or not 0 <= b < E or b == i):
                raise ValueError(
                    f"expert_bases[{i}] = {b}: low-rank expert {i} needs the index of another expert in [0, {E - 1}]"
                )
        for i in range(E):
            self.chain(i)  # raises on a cycle
        if self.active_experts is not None:
            unknown = [n for n in self.active_experts if n not in names]
            if unknown:
                raise ValueError(
                    f"active_experts = {self.active_experts}: unknown expert names {unknown}; known {names}"
                )
            if not self.active_experts:
                raise ValueError("active_experts = []: keep at least one expert active (None means all)")
        if self.forward_impl not in FORWARD_IMPLS:
            raise ValueError(f"forward_impl = {self.forward_impl!r}: expected one of {FORWARD_IMPLS}")

    # The three lists are never None after __post_init__; these typed views keep mypy honest.
    @property
    def ranks(self) -> list[int | None]:
        assert self.expert_ranks is not None
        return self.expert_ranks

    @property
    def names(self) -> list[str]:
        assert self.expert_names is not None
        return self.expert_names

    @property
    def bases(self) -> list[int | None]:
        assert self.expert_bases is not None
        return self.expert_bases

    @property
    def full_experts(self) -> list[int]:
        """Indices of the full experts, in expert order: the rows of the fused expert tensors."""
        return [i for i, r in enumerate(self.ranks) if r is None]

    def chain(self, i: int) -> list[int]:
        """The low-rank experts from i down to its full root (i first; empty for a full expert)."""
        out: list[int] = []
        e = i
        while self.ranks[e] is not None:
            if e in out:
                raise ValueError(f"expert_bases = {self.bases}: cycle through experts {[*out, e]}")
            out.append(e)
            base = self.bases[e]
            assert base is not None  # checked before chains are walked
            e = base
        return out

    def root(self, i: int) -> int:
        """The full expert that expert i's chain ends at."""
        chain = self.chain(i)
        if not chain:
            return i
        base = self.bases[chain[-1]]
        assert base is not None
        return base

    def active_indices(self) -> list[int]:
        if self.active_experts is None:
            return list(range(self.num_experts))
        return [self.names.index(n) for n in self.active_experts]


__all__ = ["FORWARD_IMPLS", "FlexMoReConfig"]
