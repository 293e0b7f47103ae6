"""The low-rank expert folder: `expert.safetensors` + `expert.json` (docs/formats.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from flexmore.storage import PROJECTIONS, atomic_write_text

FORMAT = "flexmore-expert"
FORMAT_VERSION = 1
WEIGHTS = "expert.safetensors"
META = "expert.json"


class ExpertFileError(ValueError):
    """An expert folder that cannot be used; the message names the file and tensor."""


def factor_key(layer: int, projection: str, factor: str) -> str:
    return f"layers.{layer}.{projection}.{factor}"


def router_key(layer: int) -> str:
    return f"layers.{layer}.router"


def router_bias_key(layer: int) -> str:
    """Optional: original FlexOlmo's learnt non-positive router bias (train-expert --router-bias)."""
    return f"layers.{layer}.router_bias"


@dataclass
class ExpertMeta:
    name: str
    source: str
    public_expert: int
    expert_index: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    max_rank: int
    dtype: str
    svd: str
    shapes: dict[str, list[int]]
    # per matrix "layers.{L}.{proj}": {"frobenius": ||delta||_F, "energy": {k: kept fraction}}
    matrices: dict[str, dict[str, Any]] = field(default_factory=dict)
    # SHA-256 per tensor of the public model the delta was taken against (storage.public_digest)
    public_digest: dict[str, str] = field(default_factory=dict)
    public_sha256: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / META, self.to_json())

    @classmethod
    def load(cls, folder: Path) -> ExpertMeta:
        path = Path(folder) / META
        if not path.is_file():
            raise ExpertFileError(f"{folder}: no {META} (is this an expert folder from `flexmore extract`?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ExpertFileError(f"{path}: not valid JSON ({err})") from err
        if raw.get("format") != FORMAT:
            raise ExpertFileError(f"{path}: format is {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise ExpertFileError(
                f"{path}: format version {raw['format_version']} is newer than this flexmore "
                f"({FORMAT_VERSION}); upgrade flexmore"
            )
        try:
            return cls(**raw)
        except TypeError as err:
            raise ExpertFileError(f"{path}: unexpected fields ({err})") from err

    def projection_shape(self, projection: str) -> tuple[int, int]:
        h, i = self.hidden_size, self.intermediate_size
        return (h, i) if projection == "down_proj" else (i, h)

    def tensor_specs(self, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every tensor of the weights file, in file order, with its dtype and shape."""
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        r = self.max_rank
        for layer in range(self.num_layers):
            for projection in PROJECTIONS:
                d_out, d_in = self.projection_shape(projection)
                specs[factor_key(layer, projection, "lora_A")] = (dtype, (r, d_in))
                specs[factor_key(layer, projection, "lora_B")] = (dtype, (d_out, r))
            specs[router_key(layer)] = (dtype, (self.hidden_size,))
        return specs


def energy_profile(S: torch.Tensor, rank: int, total: float | None = None) -> dict[str, Any]:
    """The `matrices` entry of expert.json: ||delta||_F and the fraction of ||delta||_F^2 that each
    power-of-two prefix rank (and `rank`) keeps. `total` is ||delta||_F^2 when S is truncated;
    by default S is taken to be the whole spectrum."""
    kept = S.to(torch.float64).square().cumsum(0)  # (r,)
    total = float(kept[-1]) if total is None else total
    ks = sorted({1 << i for i in range(rank.bit_length()) if 1 << i <= rank} | {rank})
    energy = {str(k): (float(kept[k - 1]) / total if total > 0 else 1.0) for k in ks}
    return {"frobenius": total**0.5, "energy": energy}


@dataclass
class LowRankExpert:
    """An expert in memory at a chosen rank: factors per (layer, projection) and router rows."""

    meta: ExpertMeta
    rank: int
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (A (r, d_in), B (d_out, r))
    router: torch.Tensor  # (L, H)

    def delta(self, layer: int, projection: str) -> torch.Tensor:
        A, B = self.factors[(layer, projection)]
        return B @ A  # (d_out, d_in)


class ExpertReader:
    """Lazy access to an expert folder: one factor pair at a time, at any prefix rank."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = ExpertMeta.load(self.folder)
        self.path = self.folder / WEIGHTS
        try:
            self._fh = safe_open(str(self.path), framework="pt")
            present = set(self._fh.keys())
        except (SafetensorError, OSError) as err:
            raise ExpertFileError(f"{self.path}: cannot read safetensors file ({err})") from err
        for key in self.meta.tensor_specs(torch.float32):
            if key not in present:
                raise ExpertFileError(f"{self.path}: missing tensor {key}")
        self.has_router_bias = router_bias_key(0) in present

    def check_rank(self, rank: int | None) -> int:
        rank = self.meta.max_rank if rank is None else rank
        if not 1 <= rank <= self.meta.max_rank:
            raise ExpertFileError(
                f"{self.folder}: rank must be in [1, {self.meta.max_rank}] (its max rank), got {rank}"
            )
        return rank

    def factors(self, layer: int, projection: str, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)): the rank-r prefix, read alone."""
        rank = self.check_rank(rank)
        d_out, d_in = self.meta.projection_shape(projection)
        try:
            A = self._fh.get_slice(factor_key(layer, projection, "lora_A"))[:rank]
            B = self._fh.get_slice(factor_key(layer, projection, "lora_B"))[:, :rank]
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ExpertFileError(
                f"{self.path}: cannot read {factor_key(layer, projection, 'lora_A')}/B ({err})"
            ) from err
        if tuple(A.shape) != (rank, d_in) or tuple(B.shape) != (d_out, rank):
            raise ExpertFileError(
                f"{self.path}: {factor_key(layer, projection, 'lora_A')}/lora_B have shapes "
                f"{tuple(A.shape)}/{tuple(B.shape)}, expected {(rank, d_in)}/{(d_out, rank)}"
            )
        return A, B

    def router(self, layer: int) -> torch.Tensor:
        """This expert's router row (H,)."""
        row = self._fh.get_tensor(router_key(layer))
        if tuple(row.shape) != (self.meta.hidden_size,):
            raise ExpertFileError(f"{self.path}: {router_key(layer)} has shape {tuple(row.shape)}")
        return row

    def router_bias(self, layer: int) -> float:
        """This expert's router bias, min(b, 0); 0 for an expert trained without one."""
        if not self.has_router_bias:
            return 0.0
        try:
            bias = self._fh.get_tensor(router_bias_key(layer))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ExpertFileError(f"{self.path}: cannot read {router_bias_key(layer)} ({err})") from err
        if bias.numel() != 1 or not torch.isfinite(bias).all():
            raise ExpertFileError(f"{self.path}: {router_bias_key(layer)} must be one finite number")
        return min(float(bias), 0.0)


def load_expert(folder: str | Path, rank: int | None = None) -> LowRankExpert:
    """Load an expert folder at `rank` (default: its max rank): the rank-r prefix of its factors."""
    reader = ExpertReader(folder)
    rank = reader.check_rank(rank)
    factors = {
        (layer, projection): reader.factors(layer, projection, rank)
        for layer in range(reader.meta.num_layers)
        for projection in PROJECTIONS
    }
    routers = torch.stack([reader.router(layer) for layer in range(reader.meta.num_layers)])
    return LowRankExpert(meta=reader.meta, rank=rank, factors=factors, router=routers)
