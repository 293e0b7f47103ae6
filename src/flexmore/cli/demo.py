"""`flexmore demo`: the paper's study end to end on the embedded default, no download."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from flexmore.cli.common import console, progress_bar, user_errors


def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the study writes everything.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the data split, the weights and the task items.")] = 0,
    blocks: Annotated[int, typer.Option(help="256-token held-out blocks per domain behind each score.")] = 64,
    threads: Annotated[
        int, typer.Option(help="Torch threads while evaluating (tiny models: 1 is fastest on a busy CPU).")
    ] = 1,
) -> None:
    """Run the FlexMoRE study on the embedded default: pretrain a tiny public model, train one expert per
    domain on Flower's simulation engine, extract every rank, sweep, select ranks, compose heterogeneous,
    homogeneous and FlexOlmo mixtures, evaluate them at 2, 4 and all active experts, and write
    OUT/report.md with tables and plots. About 10 minutes on 2 CPU cores; a rerun resumes."""
    with user_errors():
        from flexmore.demo import DemoConfig, run_demo

        config = DemoConfig(out=out, seed=seed, heldout_blocks=blocks, eval_threads=threads)
        start = time.perf_counter()
        report = run_demo(config, lambda line: console.print(line, highlight=False, markup=False), progress_bar)
    console.print(f"report -> {report} ({time.perf_counter() - start:.0f}s)", highlight=False)
