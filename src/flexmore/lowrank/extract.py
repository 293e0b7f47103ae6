"""PHLoRA extraction (paper section 3.2): experts to low-rank experts, streamed from safetensors.

For every domain expert E, layer L and projection: `delta = W_E - W_public`, factorised once at the
largest rank asked for; any smaller rank is a prefix of the stored factors. Each (layer, projection)
reads the public matrix once and each expert's matrix once, so peak memory is a few matrices
whatever the number of layers; every expert file is written as it goes and only becomes visible
(renamed into place) when all experts are complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexmore.lowrank.expert import WEIGHTS, ExpertMeta, energy_profile, factor_key, router_key
from flexmore.lowrank.svd import BACKENDS, factorize, resolve_backend
from flexmore.storage import (
    PROJECTIONS,
    CheckpointError,
    FlexOlmoCheckpoint,
    StreamingSafetensorsWriter,
    atomic_dir,
    atomic_write_text,
    fingerprint,
    public_digest,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64}

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ExtractConfig:
    source: str
    out: Path
    public_expert: int = 0
    experts: tuple[int, ...] | None = None  # None: every expert but the public one
    names: tuple[str, ...] | None = None  # None: the expert index
    max_rank: int | None = None  # None: largest power of two below the dense break-even
    svd: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.svd not in BACKENDS:
            raise ValueError(f"svd must be one of {', '.join(BACKENDS)}, got {self.svd!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
        if self.names is not None and self.experts is not None and len(self.names) != len(self.experts):
            raise ValueError(f"names: {len(self.names)} names for {len(self.experts)} experts")
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be unique, got {list(self.names)}")


def useful_max_rank(hidden: int, intermediate: int) -> int:
    """Largest power of two at which a low-rank expert is still smaller than a dense one.

    A rank-r factor pair of a (d_out, d_in) matrix costs r (d_out + d_in) against d_out d_in.
    """
    break_even = hidden * intermediate // (hidden + intermediate)
    return 1 << max(0, break_even.bit_length() - 1)


def extract(config: ExtractConfig, progress: Progress | None = None) -> list[Path]:
    """Run the extraction; return the expert folders written."""
    ckpt = FlexOlmoCheckpoint(config.source)
    E = ckpt.num_experts
    if E < 2:
        raise CheckpointError(f"{ckpt.folder}: has {E} expert(s); extraction needs a public and a domain expert")
    if not 0 <= config.public_expert < E:
        raise ValueError(f"public_expert must be in [0, {E - 1}], got {config.public_expert}")
    experts = config.experts if config.experts is not None else tuple(e for e in range(E) if e != config.public_expert)
    for e in experts:
        if not 0 <= e < E or e == config.public_expert:
            raise ValueError(f"experts: {e} is not a domain expert of this {E}-expert checkpoint")
    if len(set(experts)) != len(experts) or not experts:
        raise ValueError(f"experts must be distinct and non-empty, got {list(experts)}")
    names = config.names if config.names is not None else tuple(str(e) for e in experts)
    if len(names) != len(experts):
        raise ValueError(f"names: {len(names)} names for {len(experts)} experts")

    H, I, L = ckpt.hidden_size, ckpt.intermediate_size, ckpt.num_layers
    full = min(H, I)
    rank = config.max_rank if config.max_rank is not None else useful_max_rank(H, I)
    if not 1 <= rank <= full:
        raise ValueError(f"max_rank must be in [1, {full}] = [1, min(hidden, intermediate)], got {rank}")
    dtype = DTYPES[config.dtype]
    backend = resolve_backend(config.svd, rank, (I, H))
    digest = public_digest(ckpt, config.public_expert)
    metas = [
        ExpertMeta(
            name=name,
            source=str(config.source),
            public_expert=config.public_expert,
            expert_index=e,
            num_layers=L,
            hidden_size=H,
            intermediate_size=I,
            max_rank=rank,
            dtype=config.dtype,
            svd=backend,
            shapes={p: list(ckpt.expert_shape(p)) for p in PROJECTIONS},
            public_digest=digest,
            public_sha256=fingerprint(digest),
        )
        for e, name in zip(experts, names, strict=True)
    ]
    out = Path(config.out)
    total = L * len(PROJECTIONS) * len(experts)
    done = 0
    with contextlib.ExitStack() as stack:
        folders = [stack.enter_context(atomic_dir(out / m.name, config.overwrite)) for m in metas]
        writers = [
            stack.enter_context(
                StreamingSafetensorsWriter(f / WEIGHTS, m.tensor_specs(dtype), {"format": "flexmore-expert"})
            )
            for f, m in zip(folders, metas, strict=True)
        ]
        for layer in range(L):
            router = ckpt.router(layer)  # (E, H)
            for projection in PROJECTIONS:
                W0 = ckpt.expert_weight(layer, config.public_expert, projection).to(config.device, dtype)
                for meta, writer in zip(metas, writers, strict=True):
                    W = ckpt.expert_weight(layer, meta.expert_index, projection).to(config.device, dtype)
                    delta = W - W0  # (d_out, d_in)
                    del W
                    label = f"layers.{layer}.{projection}"
                    if not torch.isfinite(delta).all():
                        key = ckpt.expert_key(layer, meta.expert_index, projection)
                        raise CheckpointError(
                            f"{ckpt.folder}: NaN/Inf in the delta of expert {meta.expert_index} at "
                            f"{label} (tensor {key} or the public expert's)"
                        )
                    fact = factorize(delta, rank, backend)
                    A, B = fact.phlora(rank)  # (r, d_in), (d_out, r)
                    writer.write(factor_key(layer, projection, "lora_A"), A.to("cpu", dtype))
                    writer.write(factor_key(layer, projection, "lora_B"), B.to("cpu", dtype))
                    meta.matrices[label] = energy_profile(fact.S, rank, float(delta.to(torch.float64).square().sum()))
                    done += 1
                    if progress is not None:
                        progress(done, total, f"{meta.name} {label}")
            for meta, writer in zip(metas, writers, strict=True):
                writer.write(router_key(layer), router[meta.expert_index].to(dtype))
        for writer in writers:
            writer.close()
        for folder, meta in zip(folders, metas, strict=True):
            meta.save(folder)
            atomic_write_text(folder / "extract_config.json", _config_json(config, rank))
    return [out / m.name for m in metas]


def _config_json(config: ExtractConfig, rank: int) -> str:
    import json

    resolved = asdict(config) | {"out": str(config.out), "max_rank": rank}
    return json.dumps(resolved, indent=2) + "\n"
