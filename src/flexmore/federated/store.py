"""The server's side of the files: each expert is saved, atomically, the moment its reply arrives, so a
rerun resumes from what is already there; the mixture is composed from every saved expert.

    OUT/experts/<name>/   low-rank: an expert folder (docs/formats.md); full: a 2-expert FlexOlmo
                          checkpoint [public, name], as `train-expert` writes them. Both hold
                          `federated.json` (who sent it, its metrics, the public model's hash).
    OUT/mixture/          the composed FlexMoRE checkpoint (flexmore.mixture.compose)

No Flower here: tensors in, files out.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexmore.lowrank.expert import router_key
from flexmore.mixture.compose import TOKENIZER_FILES, ComposeConfig, ExpertSpec, compose
from flexmore.storage import (
    PROJECTIONS,
    FlexOlmoCheckpoint,
    atomic_dir,
    atomic_write_text,
    fingerprint,
    public_digest,
    write_sharded,
)
from flexmore.training.expert import write_trained_expert

from .wire import FULL, LOW_RANK, weight_key

EXPERTS, MIXTURE = "experts", "mixture"
RECEIPT = "federated.json"
PUBLIC_EXPERT = 0  # train-expert upcycles expert 0 of the public checkpoint


class StoreError(ValueError):
    """Saved experts that cannot be used with this run; the message names the folder."""


@dataclass(frozen=True)
class SavedExpert:
    name: str
    kind: str  # full | low-rank
    rank: int | None
    path: Path
    receipt: dict[str, Any]

    def spec(self) -> ExpertSpec:
        # full: expert #1 of the 2-expert checkpoint; low-rank: the folder at its max rank
        index = 1 if self.kind == FULL else None
        return ExpertSpec(name=self.name, path=str(self.path), index=index)


class PublicModel:
    """The public checkpoint and its content hash, computed once per run."""

    def __init__(self, folder: Path) -> None:
        self.ckpt = FlexOlmoCheckpoint(folder)
        self.digest = public_digest(self.ckpt, PUBLIC_EXPERT)
        self.sha256 = fingerprint(self.digest)

    @property
    def dims(self) -> tuple[int, int, int]:
        """(num_layers, hidden, intermediate)"""
        return self.ckpt.num_layers, self.ckpt.hidden_size, self.ckpt.intermediate_size


def saved_experts(out: Path, public_sha256: str) -> dict[str, SavedExpert]:
    """The experts already received into `out` (a resumed run skips them); each must be built on this
    public model, else the rerun is refused before any node trains."""
    found: dict[str, SavedExpert] = {}
    root = Path(out) / EXPERTS
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        receipt_path = folder / RECEIPT
        if not receipt_path.is_file():
            continue  # not written by a federation run: not ours to use
        receipt = json.loads(receipt_path.read_text())
        theirs = str(receipt.get("public_sha256"))
        if theirs != public_sha256:
            raise StoreError(
                f"{folder} was trained on a public model with content hash {theirs[:16]}..., "
                f"this run's is {public_sha256[:16]}...: use another --out for another public model"
            )
        found[folder.name] = SavedExpert(folder.name, receipt["kind"], receipt.get("rank"), folder, receipt)
    return found


def save_expert(
    out: Path,
    name: str,
    kind: str,
    rank: int | None,
    tensors: Mapping[str, torch.Tensor],
    public: PublicModel,
    receipt: dict[str, Any],
) -> SavedExpert:
    """Write one received expert to OUT/experts/<name> in one atomic rename (receipt included)."""
    folder = Path(out) / EXPERTS / name
    receipt = receipt | {"name": name, "kind": kind, "rank": rank, "public_sha256": public.sha256}
    with atomic_dir(folder, overwrite=False) as tmp:
        if kind == FULL:
            _write_two_expert_checkpoint(tmp, tensors, public)
        elif kind == LOW_RANK and rank is not None:
            write_trained_expert(tmp, tensors, name=name, source=f"flower:{name}", dims=public.dims, rank=rank,
                                 digest=public.digest, public_expert=PUBLIC_EXPERT)  # fmt: skip
        else:
            raise ValueError(f"kind {kind!r} with rank {rank!r}")
        atomic_write_text(tmp / RECEIPT, json.dumps(receipt, indent=2) + "\n")
    return SavedExpert(name, kind, rank, folder, receipt)


def _write_two_expert_checkpoint(folder: Path, tensors: Mapping[str, torch.Tensor], public: PublicModel) -> None:
    """[public, received] in transformers' on-disk layout, streamed: one tensor in memory at a time."""
    ckpt = public.ckpt
    f32 = torch.float32
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    producers: dict[str, Any] = {}
    for key in ckpt.non_expert_keys():
        if not key.endswith(".mlp.gate.weight"):
            specs[key] = (f32, ckpt.shape(key))
            producers[key] = lambda key=key: ckpt.tensor(key)
    H = ckpt.hidden_size
    for layer in range(ckpt.num_layers):
        gate = f"model.layers.{layer}.mlp.gate.weight"
        specs[gate] = (f32, (2, H))
        producers[gate] = lambda layer=layer: torch.stack(
            [ckpt.router(layer)[PUBLIC_EXPERT].float(), tensors[router_key(layer)].float()]
        )  # (2, H)
        for p in PROJECTIONS:
            shape = ckpt.expert_shape(p)
            for e in (0, 1):
                key = ckpt.expert_key(layer, e, p)
                specs[key] = (f32, shape)
                producers[key] = (
                    (lambda layer=layer, p=p: ckpt.expert_weight(layer, PUBLIC_EXPERT, p))
                    if e == 0
                    else (lambda layer=layer, p=p: tensors[weight_key(layer, p)])
                )
    write_sharded(folder, specs, lambda key: producers[key]().to(f32).contiguous())
    config = dict(ckpt.config) | {"num_experts": 2, "num_experts_per_tok": 2, "dtype": "float32"}
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in TOKENIZER_FILES:
        if (ckpt.folder / file).is_file():
            shutil.copy2(ckpt.folder / file, folder / file)


def compose_mixture(out: Path, public: str, experts: Mapping[str, SavedExpert], top_k: int | None) -> Path:
    """OUT/mixture: the public expert plus every saved expert, in name order (replaces an older mixture)."""
    specs = tuple(experts[name].spec() for name in sorted(experts))
    config = ComposeConfig(public=public, experts=specs, out=Path(out) / MIXTURE, top_k=top_k, overwrite=True)
    return compose(config)
