"""Compose a FlexMoRE mixture from a public FlexOlmo checkpoint and expert folders, streamed to disk.

The public checkpoint gives every non-expert tensor and the full public expert; each other expert is
a low-rank expert folder (`flexmore extract`, `train-expert --rank`) at its max rank or a prefix rank,
or a full expert taken from a FlexOlmo checkpoint. Nothing is materialised as a whole model: each
output tensor is produced and written on its own, so composing a 7x7B needs memory for a few matrices.
Two output formats: `flexmore` (FlexMoReForCausalLM, low-rank factors kept) and `flexolmo` (every
expert materialised as `W_public + B A`: a stock FlexOlmo checkpoint for transformers, vLLM, ...).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flexmore.lowrank.expert import ExpertReader
from flexmore.storage import (
    PROJECTIONS,
    CheckpointError,
    FlexOlmoCheckpoint,
    atomic_dir,
    fingerprint,
    first_difference,
    public_digest,
    resolve_source,
    write_sharded,
)

FORMATS = ("flexmore", "flexolmo")
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
RECIPE = "flexmore_recipe.json"
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)=(?P<path>.+?)(?:#(?P<index>\d+))?(?:@(?P<rank>\d+))?$")


class CompositionError(ValueError):
    """Inputs that cannot be composed; the message names the input and, for a mismatch, the tensor."""


@dataclass(frozen=True)
class ExpertSpec:
    """`NAME=DIR[@RANK]` (a low-rank expert folder) or `NAME=CHECKPOINT#INDEX` (a full expert)."""

    name: str
    path: str
    rank: int | None = None
    index: int | None = None

    @classmethod
    def parse(cls, text: str) -> ExpertSpec:
        m = _SPEC.match(text.strip())
        if m is None:
            raise CompositionError(
                f"--expert {text!r}: expected NAME=DIR[@RANK] (low-rank expert folder) or NAME=CHECKPOINT#INDEX"
            )
        rank = int(m["rank"]) if m["rank"] else None
        index = int(m["index"]) if m["index"] else None
        if rank is not None and index is not None:
            raise CompositionError(f"--expert {text!r}: a full expert (#INDEX) takes no @RANK; extract it first")
        return cls(name=m["name"], path=m["path"], rank=rank, index=index)


@dataclass(frozen=True)
class ComposeConfig:
    public: str
    experts: tuple[ExpertSpec, ...]
    out: Path
    public_name: str = "public"
    public_expert: int = 0
    top_k: int | None = None  # None: the public config's (at least 2), capped at the number of experts
    format: str = "flexmore"
    dtype: str = "float32"
    max_shard_size: int = 5 * 2**30
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CompositionError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in OUT_DTYPES:
            raise CompositionError(f"dtype must be one of {', '.join(OUT_DTYPES)}, got {self.dtype!r}")
        if not self.experts:
            raise CompositionError("give at least one --expert")
        names = [self.public_name, *(e.name for e in self.experts)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CompositionError(f"expert names must be unique; repeated: {', '.join(dupes)}")
        if self.top_k is not None and not 1 <= self.top_k <= len(names):
            raise CompositionError(f"top_k must be in [1, {len(names)}] (the number of experts), got {self.top_k}")


class _Full:
    """A full expert read from a FlexOlmo checkpoint."""

    def __init__(self, spec: ExpertSpec, ckpt: FlexOlmoCheckpoint, index: int) -> None:
        self.spec, self.ckpt, self.index, self.rank = spec, ckpt, index, None

    def weight(self, layer: int, projection: str) -> torch.Tensor:
        return self.ckpt.expert_weight(layer, self.index, projection)

    def router(self, layer: int) -> torch.Tensor:
        return self.ckpt.router(layer)[self.index]

    def router_bias(self, layer: int) -> float:
        return 0.0  # a FlexOlmo checkpoint has no router bias


class _LowRank:
    def __init__(self, spec: ExpertSpec, reader: ExpertReader, rank: int) -> None:
        self.spec, self.reader, self.rank = spec, reader, rank
        self._last: tuple[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None

    def factors(self, layer: int, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        # lora_A and lora_B are written one after the other: read the pair once.
        if self._last is None or self._last[0] != (layer, projection):
            self._last = ((layer, projection), self.reader.factors(layer, projection, self.rank))
        return self._last[1]

    def factor(self, layer: int, projection: str, which: int) -> torch.Tensor:
        """lora_A (which=0) or lora_B (which=1)."""
        return self.factors(layer, projection)[which]

    def router(self, layer: int) -> torch.Tensor:
        return self.reader.router(layer)

    def router_bias(self, layer: int) -> float:
        return self.reader.router_bias(layer)


def _open_experts(config: ComposeConfig, public: FlexOlmoCheckpoint) -> list[_Full | _LowRank]:
    """Open every expert and check it was built on this public model, with these dimensions."""
    digest = public_digest(public, config.public_expert)
    dims = (public.hidden_size, public.intermediate_size, public.num_layers)
    experts: list[_Full | _LowRank] = []
    for spec in config.experts:
        if spec.index is not None:
            ckpt = FlexOlmoCheckpoint(resolve_source(spec.path))
            if not 0 <= spec.index < ckpt.num_experts:
                raise CompositionError(
                    f"expert {spec.name!r}: {spec.path} has experts [0, {ckpt.num_experts - 1}], got #{spec.index}"
                )
            theirs = public_digest(ckpt, 0)
            where = f"{spec.path}, whose expert 0 and non-expert tensors"
            found_dims = (ckpt.hidden_size, ckpt.intermediate_size, ckpt.num_layers)
            experts.append(_Full(spec, ckpt, spec.index))
        else:
            reader = ExpertReader(Path(spec.path))
            try:
                rank = reader.check_rank(spec.rank)
            except ValueError as err:
                raise CompositionError(f"expert {spec.name!r}: {err}") from err
            theirs = reader.meta.public_digest
            where = f"{spec.path}, which was extracted against a public model that"
            m = reader.meta
            found_dims = (m.hidden_size, m.intermediate_size, m.num_layers)
            experts.append(_LowRank(spec, reader, rank))
        if found_dims != dims:
            raise CompositionError(
                f"expert {spec.name!r}: (hidden, intermediate, layers) = {found_dims}, public model has {dims}"
            )
        diff = first_difference(digest, theirs)
        if diff is not None:
            raise CompositionError(
                f"expert {spec.name!r} was not built on this public model: {where} differ from "
                f"{public.folder} first at tensor {diff}"
            )
    return experts


def compose(config: ComposeConfig, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write the composed checkpoint to `config.out` (atomically) and return it."""
    public = FlexOlmoCheckpoint(resolve_source(config.public))
    if public.num_experts < 1:
        raise CheckpointError(f"{public.folder}: no experts")
    experts = _open_experts(config, public)
    E = 1 + len(experts)
    dtype = OUT_DTYPES[config.dtype]
    # Default: the public config's top-k, but at least 2: experts are trained top-2 of 2 beside the
    # public expert, and a 1-expert public model (flexmore pretrain) says top-1.
    top_k = (
        config.top_k if config.top_k is not None else min(max(int(public.config.get("num_experts_per_tok", 2)), 2), E)
    )
    H, I = public.hidden_size, public.intermediate_size
    names = [config.public_name, *(e.spec.name for e in experts)]
    ranks: list[int | None] = [None, *(e.rank for e in experts)]

    @functools.lru_cache(maxsize=len(PROJECTIONS))  # read each public matrix once, not once per expert
    def public_weight(layer: int, projection: str) -> torch.Tensor:
        return public.expert_weight(layer, config.public_expert, projection)

    def router(layer: int) -> torch.Tensor:
        rows = [public.router(layer)[config.public_expert], *(e.router(layer) for e in experts)]
        return torch.stack(rows)  # (E, H)

    # Original FlexOlmo's router bias travels when an expert was trained with one (--router-bias).
    biased = any(isinstance(e, _LowRank) and e.reader.has_router_bias for e in experts)

    def router_bias(layer: int) -> torch.Tensor:
        return torch.tensor([0.0, *(e.router_bias(layer) for e in experts)])  # (E,), 0 for the public expert

    if biased and config.format == "flexolmo":
        for layer in range(public.num_layers):
            bias = router_bias(layer)
            if (bias < 0).any():
                name = names[int((bias < 0).nonzero()[0])]
                raise CompositionError(
                    f"expert {name!r} has a negative router bias at layer {layer} (trained with --router-bias); "
                    "stock FlexOlmo has no router bias to hold it: compose with --format flexmore"
                )
        biased = False  # all zero: nothing to carry

    def dense(e: int, layer: int, projection: str) -> torch.Tensor:
        if e == 0:
            return public_weight(layer, projection)
        expert = experts[e - 1]
        if isinstance(expert, _Full):
            return expert.weight(layer, projection)
        A, B = expert.factors(layer, projection)  # (r, d_in), (d_out, r)
        return public_weight(layer, projection).float() + B.float() @ A.float()  # (d_out, d_in)

    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    producers: dict[str, Callable[[], torch.Tensor]] = {}
    for key in public.non_expert_keys():
        if not key.endswith(".mlp.gate.weight"):
            specs[key] = (dtype, public.shape(key))
            producers[key] = functools.partial(public.tensor, key)
    for layer in range(public.num_layers):
        _add_moe(specs, producers, layer, config.format, dtype, E, H, I, experts, router, dense)
        if biased:
            specs[f"model.layers.{layer}.mlp.gate.bias"] = (dtype, (E,))
            producers[f"model.layers.{layer}.mlp.gate.bias"] = functools.partial(router_bias, layer)

    with atomic_dir(Path(config.out), config.overwrite) as tmp:

        def produce(name: str) -> torch.Tensor:
            tensor = producers[name]()
            if not torch.isfinite(tensor).all():
                raise CompositionError(f"NaN/Inf in composed tensor {name}")
            return tensor.to(dtype).contiguous()

        write_sharded(tmp, specs, produce, config.max_shard_size, progress)
        cfg = _config(public.config, config, E, top_k, names, ranks) | ({"router_bias": True} if biased else {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for file in TOKENIZER_FILES:
            if (public.folder / file).is_file():
                shutil.copy2(public.folder / file, tmp / file)
        recipe = {
            "format": config.format,
            "public": {
                "source": config.public,
                "expert": config.public_expert,
                "sha256": fingerprint(public_digest(public, config.public_expert)),
            },
            "experts": [
                {"name": config.public_name, "rank": None, "source": config.public, "index": config.public_expert},
                *(asdict(e.spec) | {"rank": e.rank} for e in experts),
            ],
            "top_k": top_k,
            "dtype": config.dtype,
        }
        (tmp / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    return Path(config.out)


def _add_moe(
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    producers: dict[str, Callable[[], torch.Tensor]],
    layer: int,
    fmt: str,
    dtype: torch.dtype,
    E: int,
    H: int,
    I: int,
    experts: list[_Full | _LowRank],
    router: Callable[[int], torch.Tensor],
    dense: Callable[[int, int, str], torch.Tensor],
) -> None:
    """The MoE tensors of one layer, in the layout of the output format."""
    prefix = f"model.layers.{layer}.mlp"
    specs[f"{prefix}.gate.weight"] = (dtype, (E, H))
    producers[f"{prefix}.gate.weight"] = lambda: router(layer)
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    if fmt == "flexolmo":
        # transformers' on-disk layout: one tensor per expert and projection.
        for e in range(E):
            for p in PROJECTIONS:
                key = f"{prefix}.experts.{e}.{p}.weight"
                specs[key] = (dtype, shapes[p])
                producers[key] = functools.partial(dense, e, layer, p)
        return
    full = [0] + [e + 1 for e, x in enumerate(experts) if isinstance(x, _Full)]
    F = len(full)
    specs[f"{prefix}.experts.gate_up_proj"] = (dtype, (F, 2 * I, H))
    producers[f"{prefix}.experts.gate_up_proj"] = lambda: torch.stack(
        [torch.cat([dense(e, layer, "gate_proj"), dense(e, layer, "up_proj")]) for e in full]
    )  # (F, 2I, H)
    specs[f"{prefix}.experts.down_proj"] = (dtype, (F, H, I))
    producers[f"{prefix}.experts.down_proj"] = lambda: torch.stack([dense(e, layer, "down_proj") for e in full])
    for e, expert in enumerate(experts, start=1):
        if not isinstance(expert, _LowRank):
            continue
        for p in PROJECTIONS:
            d_out, d_in = shapes[p]
            r = expert.rank
            base = f"{prefix}.experts.low_rank.{e}.{p}"
            specs[f"{base}.lora_A"] = (dtype, (r, d_in))
            specs[f"{base}.lora_B"] = (dtype, (d_out, r))
            producers[f"{base}.lora_A"] = functools.partial(expert.factor, layer, p, 0)
            producers[f"{base}.lora_B"] = functools.partial(expert.factor, layer, p, 1)


def _config(
    public: dict[str, Any], config: ComposeConfig, E: int, top_k: int, names: list[str], ranks: list[int | None]
) -> dict[str, Any]:
    cfg = {k: v for k, v in public.items() if k not in ("architectures", "model_type", "transformers_version")}
    cfg |= {"num_experts": E, "num_experts_per_tok": top_k, "dtype": config.dtype}
    if config.format == "flexolmo":
        return cfg | {"model_type": "flex_olmo", "architectures": ["FlexOlmoForCausalLM"]}
    bases = [None if r is None else 0 for r in ranks]
    return cfg | {
        "model_type": "flexmore",
        "architectures": ["FlexMoReForCausalLM"],
        "expert_ranks": ranks,
        "expert_names": names,
        "expert_bases": bases,
        "active_experts": None,
        "router_bias": False,
    }
