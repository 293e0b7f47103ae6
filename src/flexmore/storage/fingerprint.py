"""Identity of a public model: one SHA-256 per tensor, independent of sharding and expert layout.

Every expert must be built on the same public model (FlexOlmo's merge insists on it). Experts record
the digest of the public model they were taken against, so composition can name the first tensor
that differs without reading the expert's source checkpoint again.
"""

from __future__ import annotations

import hashlib

import torch

from flexmore.storage.checkpoint import PROJECTIONS, FlexOlmoCheckpoint


def _sha(tensor: torch.Tensor) -> str:
    # float32 bytes: the same weights stored in bf16 or fp32 hash alike.
    data = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    h = hashlib.sha256(str(tuple(tensor.shape)).encode())
    h.update(data.view(torch.uint8).numpy().data)
    return h.hexdigest()


def public_digest(ckpt: FlexOlmoCheckpoint, public_expert: int = 0) -> dict[str, str]:
    """SHA-256 of every tensor of the public model: non-expert tensors (routers excepted: their rows
    differ by construction) and the public expert, named in the per-expert layout."""
    digest = {k: _sha(ckpt.tensor(k)) for k in ckpt.non_expert_keys() if not k.endswith(".mlp.gate.weight")}
    for layer in range(ckpt.num_layers):
        for projection in PROJECTIONS:
            key = f"model.layers.{layer}.mlp.experts.public.{projection}.weight"
            digest[key] = _sha(ckpt.expert_weight(layer, public_expert, projection))
    return dict(sorted(digest.items()))


def fingerprint(digest: dict[str, str]) -> str:
    """One SHA-256 for the whole public model."""
    h = hashlib.sha256()
    for key, value in sorted(digest.items()):
        h.update(f"{key}={value}\n".encode())
    return h.hexdigest()


def first_difference(expected: dict[str, str], found: dict[str, str]) -> str | None:
    """The first tensor (in name order) missing from either side or with another digest."""
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            return key
    return None
