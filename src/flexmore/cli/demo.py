"""`flexmore demo`: the embedded default, end to end on a laptop CPU, no download."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from flexmore.cli.common import console, progress_bar


def demo_command(
    out: Annotated[Path, typer.Option(help="Where the demo writes its artefacts.")] = Path("runs/demo"),
) -> None:
    """Build a tiny 4-expert FlexOlmo checkpoint locally, extract its three domain experts as low-rank
    experts (PHLoRA), check the reconstruction error per rank, and count parameters of mixtures."""
    from transformers.utils import logging as hf_logging

    from flexmore.analysis.params import count, mixture_config
    from flexmore.lowrank.expert import load_expert
    from flexmore.lowrank.extract import ExtractConfig, extract
    from flexmore.storage import FlexOlmoCheckpoint
    from flexmore.toy import save_tiny_flexolmo, tiny_config

    hf_logging.disable_progress_bar()  # our own progress bars only
    start = time.perf_counter()
    source = out / "flexolmo-tiny"
    config = tiny_config(4, hidden_size=128, intermediate_size=352, num_hidden_layers=4, vocab_size=512)
    console.print(f"[bold]1. tiny FlexOlmo[/bold] (4 experts, hidden 128, intermediate 352, 4 layers) -> {source}")
    save_tiny_flexolmo(source, config, max_shard_size="200KB")
    experts_dir = out / "experts"
    console.print(f"[bold]2. extract[/bold] experts 1,2,3 against public expert 0 -> {experts_dir}")
    with progress_bar("extract") as update:
        extract(
            ExtractConfig(source=str(source), out=experts_dir, names=("code", "math", "news"), overwrite=True),
            update,
        )
    ckpt = FlexOlmoCheckpoint(source)
    console.print("[bold]3. relative reconstruction error ||W_E - (W_0 + B_r A_r)||_F / ||W_E - W_0||_F[/bold]")
    for name in ("code", "math", "news"):
        expert = load_expert(experts_dir / name)
        cells = []
        for rank in sorted({1, 4, 16, 64, expert.meta.max_rank}):
            err = num = 0.0
            for (layer, proj), (A, B) in load_expert(experts_dir / name, rank).factors.items():
                delta = ckpt.expert_weight(layer, expert.meta.expert_index, proj) - ckpt.expert_weight(layer, 0, proj)
                err += float((delta - B @ A).square().sum())
                num += float(delta.square().sum())
            cells.append(f"r={rank}: {(err / num) ** 0.5:.3f}")
        console.print(f"  {name:5s} " + "  ".join(cells))
    console.print("[bold]4. parameters[/bold] (meta device, from the config)")
    for ranks in ([None, None, None, None], [None, 64, 8, 1], [None, 16, 16, 16]):
        r = count(mixture_config(config.to_dict(), list(ranks)))
        label = ",".join("full" if x is None else str(x) for x in ranks)
        console.print(f"  {label:20s} total {r.total:>9,}  experts {r.experts}")
    console.print(f"done in {time.perf_counter() - start:.1f}s")
