"""`flexmore compose`: a FlexMoRE mixture from a public checkpoint and expert folders."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from flexmore.cli.common import console, progress_bar, user_errors


def compose_command(
    public: Annotated[
        str,
        typer.Option(
            help="FlexOlmo checkpoint (folder or hub id): expert 0 and every non-expert tensor are the public model."
        ),
    ],
    expert: Annotated[
        list[str],
        typer.Option(
            "--expert",
            help="NAME=DIR\\[@RANK]: a low-rank expert folder at its max rank or a prefix rank; "
            "NAME=CHECKPOINT#INDEX: full expert INDEX of a FlexOlmo checkpoint. Repeat, in routing order.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint folder.")],
    top_k: Annotated[int | None, typer.Option(help="Active experts per token (default: the public config's).")] = None,
    format: Annotated[
        str, typer.Option(help="flexmore: FlexMoReForCausalLM (low-rank kept) | flexolmo: dense stock FlexOlmo.")
    ] = "flexmore",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    public_name: Annotated[str, typer.Option(help="Name of the public expert.")] = "public",
    max_shard_size: Annotated[int, typer.Option(help="Largest safetensors shard, in MB.")] = 5120,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Compose one full public expert and rank-heterogeneous experts into a mixture (paper eq. 7).
    Every input must be built on the same public model; the first differing tensor is named."""
    from flexmore.mixture.compose import ComposeConfig, ExpertSpec, compose

    with user_errors():
        config = ComposeConfig(
            public=public,
            experts=tuple(ExpertSpec.parse(e) for e in expert),
            out=out,
            public_name=public_name,
            top_k=top_k,
            format=format,
            dtype=dtype,
            max_shard_size=max_shard_size * 2**20,
            overwrite=overwrite,
        )
        start = time.perf_counter()
        with progress_bar("compose") as update:
            path = compose(config, update)
    console.print(f"wrote {config.format} checkpoint {path} in {time.perf_counter() - start:.1f}s")
