"""`flexmore extract`: full-size experts to low-rank experts (PHLoRA)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from flexmore.cli.common import console, progress_bar, user_errors


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise typer.BadParameter(f"expected comma-separated expert indices, got {text!r}") from err


def extract_command(
    source: Annotated[str, typer.Argument(help="FlexOlmo checkpoint folder, or a hub id (online only).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder that receives one expert folder per expert.")],
    public_expert: Annotated[int, typer.Option(help="Index of the public expert every delta is taken against.")] = 0,
    experts: Annotated[
        str | None,
        typer.Option(help="Comma-separated domain experts to extract (default: all but the public one)."),
    ] = None,
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="Name of each extracted expert, in --experts order (repeat)."),
    ] = None,
    max_rank: Annotated[
        int | None,
        typer.Option(
            help="Largest rank stored; every smaller rank is a prefix of it. "
            "Default: the largest power of two below the size of a dense expert."
        ),
    ] = None,
    svd: Annotated[
        str,
        typer.Option(help="auto | exact | randomized | gram (auto: randomized for small ranks, else gram)."),
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="float32 | float64: compute and storage dtype of the factors.")
    ] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace existing expert folders.")] = False,
) -> None:
    """Turn full-size domain experts into low-rank experts by truncated SVD of their delta to the
    public expert (FlexMoRE paper, section 3.2). Streams one matrix at a time from the safetensors
    files; writes OUT/<name>/expert.safetensors + expert.json atomically."""
    from flexmore.lowrank.extract import ExtractConfig, extract  # torch/transformers load only when used
    from flexmore.storage import resolve_source

    with user_errors():
        folder = resolve_source(source)
        config = ExtractConfig(
            source=str(folder),
            out=out,
            public_expert=public_expert,
            experts=_ints(experts),
            names=tuple(name) if name else None,
            max_rank=max_rank,
            svd=svd,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
        )
        start = time.perf_counter()
        with progress_bar("extract") as update:
            written = extract(config, update)
    console.print(f"wrote {len(written)} expert(s) in {time.perf_counter() - start:.1f}s:")
    for path in written:
        console.print(f"  {path}")
