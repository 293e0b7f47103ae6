"""A safetensors writer that streams tensors to disk one at a time.

The header (names, dtypes, shapes, offsets) is known before any data, so it is written first and
each tensor's bytes follow in header order. Peak memory is one tensor, whatever the file size; the
result is a standard safetensors file (`safetensors.safe_open` reads it).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import torch

_DTYPES = {
    torch.float64: ("F64", 8),
    torch.float32: ("F32", 4),
    torch.float16: ("F16", 2),
    torch.bfloat16: ("BF16", 2),
}


class StreamingSafetensorsWriter:
    def __init__(
        self,
        path: Path,
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {})}
        offset = 0
        for name, (dtype, shape) in specs.items():
            if dtype not in _DTYPES:
                raise ValueError(f"unsupported dtype {dtype} for {name}")
            code, size = _DTYPES[dtype]
            nbytes = math.prod(shape) * size
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self._order = list(specs)
        self._specs = specs
        self._next = 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()/__exit__
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"tensors must be written in header order: expected {expected}, got {name}")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: expected {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous()
        self._fh.write(data.reshape(-1).view(torch.uint8).numpy().data)  # no copy
        self._next += 1

    def close(self) -> None:
        if not self._fh.closed:
            complete = self._next == len(self._order)
            self._fh.close()
            if not complete:
                raise RuntimeError(f"closed after {self._next} of {len(self._order)} tensors")

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._fh.close()
            return
        self.close()


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * _DTYPES[dtype][1]


def write_sharded(
    folder: Path,
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    max_shard_bytes: int = 5 * 2**30,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, str]:
    """Write a transformers-style checkpoint, producing one tensor at a time in `specs` order.

    `model.safetensors` when everything fits one shard, else `model-0000i-of-0000N.safetensors` and
    `model.safetensors.index.json`, as `save_pretrained` writes them. Returns the weight map.
    """
    shards: list[dict[str, tuple[torch.dtype, tuple[int, ...]]]] = [{}]
    size = 0
    for name, (dtype, shape) in specs.items():
        nbytes = tensor_nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dtype, shape)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    done = 0
    for file, shard in zip(names, shards, strict=True):
        with StreamingSafetensorsWriter(folder / file, shard, {"format": "pt"}) as writer:
            for name in shard:
                writer.write(name, produce(name))
                weight_map[name] = file
                done += 1
                if progress is not None:
                    progress(done, len(specs), name)
    if n > 1:
        total = sum(tensor_nbytes(*spec) for spec in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
