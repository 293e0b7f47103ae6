"""`flexmore sweep`: public + one expert at each rank, evaluated and appended to a results store (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexmore.cli.common import console, out, progress_bar, user_errors
from flexmore.cli.eval import BatchSize, Cache, Heldout, Include, Limit, Seed, Tasks, eval_config


def _ranks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--ranks {text!r}: expected a comma list of integers, e.g. 1,2,4,8") from None


def _experts(specs: list[str]) -> dict[str, str]:
    experts: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--expert {spec!r}: expected NAME=DIR (low-rank expert folder or FlexOlmo checkpoint)")
        if name in experts:
            raise ValueError(f"--expert {name!r} given twice")
        experts[name] = path
    return experts


def sweep_command(
    public: Annotated[str, typer.Option(help="The public FlexOlmo checkpoint folder (expert 0 is public).")],
    expert: Annotated[
        list[str],
        typer.Option(
            "--expert",
            help="NAME=DIR: a low-rank expert folder, or a FlexOlmo checkpoint (DIR = its expert 1, DIR#INDEX), "
            "extracted once and also evaluated full-size. Repeatable.",
        ),
    ],
    results: Annotated[Path, typer.Option(help="Results store (JSONL): points already in it are skipped.")],
    ranks: Annotated[
        str | None, typer.Option(help="Comma list of ranks (default: powers of two up to the expert's max rank).")
    ] = None,
    active: Annotated[int, typer.Option(help="Experts per token (2 = public and expert).")] = 2,
    full: Annotated[bool, typer.Option(help="Also evaluate full-size experts (FlexOlmo checkpoints) as given.")] = True,
    work: Annotated[Path | None, typer.Option(help="Where extracted experts go (default: next to --results).")] = None,
    tasks: Tasks = "embedded",
    heldout: Heldout = False,
    limit: Limit = 100,
    include: Include = None,
    seed: Seed = 0,
    cache: Cache = None,
    batch_size: BatchSize = 32,
) -> None:
    """Rank sweep: for each expert and rank, compose public + expert in memory, evaluate it, append it."""
    from transformers.utils import logging as hf_logging

    from flexmore.analysis.scores import point_scores
    from flexmore.evaluation.store import ResultStore
    from flexmore.evaluation.sweep import sweep

    hf_logging.disable_progress_bar()
    with user_errors():
        config = eval_config(tasks, limit, heldout, include, seed, cache, batch_size)
        experts = _experts(expert)
        store = ResultStore(results)
        with progress_bar("sweep") as update:
            report = sweep(
                public, experts, store, config, _ranks(ranks), active=active, full=full, work=work, progress=update
            )
    console.print(
        f"{len(report.evaluated)} points evaluated, {len(report.skipped)} already in {results}"
        + (f"; extracted {', '.join(map(str, report.extracted))}" if report.extracted else ""),
        soft_wrap=True,
    )
    keys = set(report.evaluated) | set(report.skipped)
    points = [p for p in point_scores(store.records()) if p.key in keys]
    groups = list(dict.fromkeys(g for p in points for g in p.groups))
    table = Table(title=f"rank sweep (active {active})", title_justify="left")
    for col in ("expert", "rank", "params", *groups, "Avg"):
        table.add_column(col, justify="left" if col == "expert" else "right")
    for p in sorted(points, key=lambda p: (p.expert or "", p.rank is None, p.rank or 0)):
        cells = [f"{p.groups[g]:.4f}" if g in p.groups else "" for g in groups]
        table.add_row(
            p.expert or p.mixture,
            "full" if p.rank is None else str(p.rank),
            f"{p.params:,}" if p.params else "",
            *cells,
            f"{p.avg():.4f}",
        )
    out.print(table)
