"""Streaming read access to FlexOlmo checkpoints, in both expert layouts.

On disk (`save_pretrained`, the Hub) experts are stored one tensor per expert and projection:
`model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight`. The fused in-memory layout of
transformers v5 (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)) may also be
found on disk. Both are read here through `safe_open` slices, so one expert's matrix is read without
loading the rest of the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and tensor at fault in the message."""


@dataclass(frozen=True)
class _Location:
    file: Path
    key: str


class FlexOlmoCheckpoint:
    """A local FlexOlmo checkpoint folder (config.json + one or many safetensors files)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.folder}: no config.json (is this a checkpoint folder?)")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_experts"):
            if not isinstance(self.config.get(field), int):
                raise CheckpointError(f"{config_path}: missing integer field {field!r}")
        self.hidden_size: int = self.config["hidden_size"]
        self.intermediate_size: int = self.config["intermediate_size"]
        self.num_layers: int = self.config["num_hidden_layers"]
        self.num_experts: int = self.config["num_experts"]
        self._handles: dict[Path, Any] = {}
        self._weight_map = self._read_weight_map()

    # -- index -------------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                entries = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
            files = {name: self.folder / file for name, file in entries.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise CheckpointError(f"{index}: lists {file.name}, which is missing")
            return files
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.folder}: no *.safetensors files")
        files = {}
        for file in shards:
            for name in self._open(file).keys():  # noqa: SIM118 - a safe_open handle, not a dict
                files[name] = file
        return files

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file}: cannot read safetensors file ({err})") from err
        return self._handles[file]

    def keys(self) -> list[str]:
        return sorted(self._weight_map)

    def has(self, key: str) -> bool:
        return key in self._weight_map

    def file_of(self, key: str) -> Path:
        if key not in self._weight_map:
            raise CheckpointError(f"{self.folder}: missing tensor {key}")
        return self._weight_map[key]

    def tensor(self, key: str) -> torch.Tensor:
        file = self.file_of(key)
        try:
            return self._open(file).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file}: cannot read tensor {key} ({err})") from err

    def shape(self, key: str) -> tuple[int, ...]:
        file = self.file_of(key)
        return tuple(self._open(file).get_slice(key).get_shape())

    # -- experts -----------------------------------------------------------------------------
    def _fused_key(self, layer: int, projection: str) -> str:
        name = "down_proj" if projection == "down_proj" else "gate_up_proj"
        return f"model.layers.{layer}.mlp.experts.{name}"

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"

    def expert_shape(self, projection: str) -> tuple[int, int]:
        """(d_out, d_in) of one expert projection, as the config says it must be."""
        h, i = self.hidden_size, self.intermediate_size
        return (h, i) if projection == "down_proj" else (i, h)

    def expert_weight(self, layer: int, expert: int, projection: str) -> torch.Tensor:
        """One expert's projection matrix (d_out, d_in), read alone from either layout."""
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if not 0 <= expert < self.num_experts:
            raise CheckpointError(f"{self.folder}: expert {expert} out of range [0, {self.num_experts - 1}]")
        key = self.expert_key(layer, expert, projection)
        if self.has(key):
            weight = self.tensor(key)
        else:
            fused = self._fused_key(layer, projection)
            if not self.has(fused):
                raise CheckpointError(f"{self.folder}: missing tensor {key} (nor the fused {fused} layout)")
            file = self.file_of(fused)
            try:
                view = self._open(file).get_slice(fused)
                if projection == "down_proj":
                    weight = view[expert]
                else:
                    i = self.intermediate_size
                    rows = slice(0, i) if projection == "gate_proj" else slice(i, 2 * i)
                    weight = view[expert : expert + 1, rows][0]
            except (SafetensorError, OSError, RuntimeError, IndexError) as err:
                raise CheckpointError(f"{file}: cannot read {fused}[{expert}] ({err})") from err
            key = f"{fused}[{expert}]"
        expected = self.expert_shape(projection)
        if tuple(weight.shape) != expected:
            raise CheckpointError(
                f"{self.file_of(key.split('[')[0])}: tensor {key} has shape {tuple(weight.shape)}, "
                f"expected {expected} from config.json"
            )
        return weight

    def router(self, layer: int) -> torch.Tensor:
        """The router `mlp.gate.weight` of one layer (E, H)."""
        key = f"model.layers.{layer}.mlp.gate.weight"
        weight = self.tensor(key)
        if tuple(weight.shape) != (self.num_experts, self.hidden_size):
            raise CheckpointError(
                f"{self.file_of(key)}: tensor {key} has shape {tuple(weight.shape)}, "
                f"expected {(self.num_experts, self.hidden_size)}"
            )
        return weight

    def non_expert_keys(self) -> list[str]:
        """Every tensor that is not an expert weight (attention, norms, embeddings, routers)."""
        return [k for k in self.keys() if ".mlp.experts." not in k]


def resolve_source(source: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (config and safetensors only) when online."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint folder, got a file")
        return path
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise CheckpointError(f"{source}: no such folder (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"]))
    except Exception as err:  # offline, unknown repo, gated...
        raise CheckpointError(f"{source}: not a local folder, and the hub download failed ({err})") from err
