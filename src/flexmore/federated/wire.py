"""What travels: an expert's tensors <-> a Flower ArrayRecord, the keys and shapes a reply may carry,
and how many bytes a message takes on the wire.

Keys (one expert, layer L, projection P in gate_proj/up_proj/down_proj):
- full expert:     `layers.{L}.{P}.weight` (d_out, d_in), `layers.{L}.router` (H,)
- low-rank expert: `layers.{L}.{P}.lora_A` (r, d_in), `layers.{L}.{P}.lora_B` (d_out, r), `layers.{L}.router` (H,)
(the low-rank keys are those of the expert folder, docs/formats.md). Arrays are float32: ArrayRecord
cannot hold bf16, and a bf16 expert is exactly representable in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from flexmore.lowrank.expert import ExpertReader, factor_key, router_key
from flexmore.storage import PROJECTIONS, FlexOlmoCheckpoint

FULL, LOW_RANK = "full", "low-rank"
NEW_EXPERT = 1  # index of the trained expert in train-expert's 2-expert checkpoint


class WireError(ValueError):
    """A reply whose arrays are not exactly the expected expert: the message names the key."""


def weight_key(layer: int, projection: str) -> str:
    return f"layers.{layer}.{projection}.weight"


def expected_shapes(
    kind: str, num_layers: int, hidden: int, intermediate: int, rank: int | None
) -> dict[str, tuple[int, ...]]:
    """Every key an expert reply must carry, with its shape, and nothing else."""
    if kind not in (FULL, LOW_RANK) or (kind == LOW_RANK) != (rank is not None):
        raise ValueError(f"kind {kind!r} with rank {rank!r}: expected full/None or low-rank/R")
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(num_layers):
        for p in PROJECTIONS:
            d_out, d_in = (hidden, intermediate) if p == "down_proj" else (intermediate, hidden)
            if rank is None:
                shapes[weight_key(layer, p)] = (d_out, d_in)
            else:
                shapes[factor_key(layer, p, "lora_A")] = (rank, d_in)
                shapes[factor_key(layer, p, "lora_B")] = (d_out, rank)
        shapes[router_key(layer)] = (hidden,)
    return shapes


# ---------------------------------------------------------------- reading a trained expert (client side)


def full_expert_tensors(checkpoint: Path, expert: int = NEW_EXPERT) -> dict[str, torch.Tensor]:
    """Expert `expert` of a FlexOlmo checkpoint (train-expert's full output): its matrices and router row."""
    ckpt = FlexOlmoCheckpoint(checkpoint)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(ckpt.num_layers):
        for p in PROJECTIONS:
            tensors[weight_key(layer, p)] = ckpt.expert_weight(layer, expert, p)  # (d_out, d_in)
        tensors[router_key(layer)] = ckpt.router(layer)[expert]  # (H,)
    return tensors


def low_rank_expert_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every factor and router row of an expert folder (train-expert --rank's output), at its max rank."""
    reader = ExpertReader(folder)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(reader.meta.num_layers):
        for p in PROJECTIONS:
            A, B = reader.factors(layer, p)  # (r, d_in), (d_out, r)
            tensors[factor_key(layer, p, "lora_A")] = A
            tensors[factor_key(layer, p, "lora_B")] = B
        tensors[router_key(layer)] = reader.router(layer)  # (H,)
    return tensors


# ---------------------------------------------------------------- ArrayRecord <-> tensors


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """float32 numpy arrays (ArrayRecord has no bf16), in key order."""
    arrays = {
        key: Array(np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())) for key, t in tensors.items()
    }
    return ArrayRecord(arrays)


def from_array_record(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of a reply, checked to be exactly `expected`: same keys, shapes, float32, finite."""
    keys = set(record.keys())
    extra = sorted(keys - set(expected))
    missing = sorted(set(expected) - keys)
    if extra or missing:
        raise WireError(
            f"the expert's arrays differ from the expected keys: {len(extra)} unexpected {extra[:4]}, "
            f"{len(missing)} missing {missing[:4]}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        array = record[key]
        if array.dtype != "float32" or tuple(array.shape) != tuple(shape):
            raise WireError(f"array {key}: {array.dtype} {tuple(array.shape)}, expected float32 {tuple(shape)}")
        tensor = torch.from_numpy(array.numpy().copy())
        if not torch.isfinite(tensor).all():
            raise WireError(f"array {key}: NaN or Inf")
        tensors[key] = tensor
    return tensors


# ---------------------------------------------------------------- accounting


def message_bytes(message: Message) -> int:
    """Bytes of the message on the wire: Flower sends a message as its deduplicated object tree (message,
    records, arrays, array chunks), each deflated; transport framing (HTTP/gRPC) is not counted."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def describe(message: Message) -> dict[str, Any]:
    """What a message carries, without its values: record names, array keys with dtype/shape, config and
    metric keys. The audit trail the tests check against the expected expert keys."""
    if message.has_error():
        return {"error": {"code": message.error.code, "reason": message.error.reason}}
    content = message.content
    return {
        "arrays": {
            name: {key: [a.dtype, list(a.shape)] for key, a in record.items()}
            for name, record in content.array_records.items()
        },
        "configs": {name: sorted(record.keys()) for name, record in content.config_records.items()},
        "metrics": {name: sorted(record.keys()) for name, record in content.metric_records.items()},
    }


def payload_bytes(message: Message) -> int:
    """Bytes of tensor data alone (float32 values) in the message's ArrayRecords."""
    if message.has_error():
        return 0
    return sum(
        int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
        for record in message.content.array_records.values()
        for a in record.values()
    )
