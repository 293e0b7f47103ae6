"""`flexmore select`: a rank per expert from a sweep's results (or, data-free, from expert folders)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from flexmore.cli.common import console, out, user_errors

if TYPE_CHECKING:
    from flexmore.selection import Selection


def select_command(
    strategy: Annotated[
        str,
        typer.Option(
            help="proxy:GROUP (e.g. proxy:MC9) | proxy:avg | budget:PARAMS[:GROUP] (e.g. budget:2B) | "
            "energy:FRACTION[:pooled] (e.g. energy:0.9, data-free)."
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the chosen ranks (JSON).")],
    results: Annotated[
        Path | None, typer.Option(help="The sweep's results store (results.jsonl); not needed for energy.")
    ] = None,
    expert: Annotated[
        list[str] | None,
        typer.Option(
            "--expert",
            help="NAME=DIR: an expert folder. Restricts the choice to these experts, gives parameter "
            "costs and, for energy, the spectrum; with them the full compose command is printed. Repeat.",
        ),
    ] = None,
    config: Annotated[str | None, typer.Option(help="A FlexOlmo config.json (or folder) for parameter costs.")] = None,
    active: Annotated[int | None, typer.Option(help="The sweep's active count, if it measured several.")] = None,
    include_full: Annotated[
        bool | None,
        typer.Option(help="Let a measured full-size expert compete (default: no for proxy, yes for budget)."),
    ] = None,
    public: Annotated[str, typer.Option(help="Public checkpoint to put in the printed compose command.")] = "PUBLIC",
) -> None:
    """Choose a rank per expert: the paper's proxy (best score, lowest rank on ties), a parameter
    budget (exact knapsack over the measured points) or the delta's spectrum (data-free)."""
    from flexmore.analysis.scores import point_scores
    from flexmore.cli.params import read_config
    from flexmore.evaluation.store import ResultStore
    from flexmore.selection import (
        Strategy,
        cost_from_config,
        cost_from_folders,
        parse_folders,
        select_ranks,
    )

    with user_errors():
        s = Strategy.parse(strategy)
        folders = parse_folders(expert or [])
        points = []
        if s.kind != "energy":
            if results is None:
                raise ValueError(f"strategy {strategy!r} reads measured scores: give --results")
            if not results.is_file():
                raise FileNotFoundError(f"{results}: no such results store")
            points = point_scores(ResultStore(results).records())
        cost = None
        if config is not None:
            cost = cost_from_config(read_config(config))
        elif any("#" not in p for p in folders.values()):
            cost = cost_from_folders(folders)
        selection = select_ranks(s, points, folders=folders, cost=cost, active=active, include_full=include_full)
        selection.write(out_path, folders)
    _print(selection, folders, public)
    console.print(f"wrote {out_path}")


def _print(selection: Selection, folders: dict[str, str], public: str) -> None:
    from flexmore.analysis.tables import fmt, rank_label

    table = Table(title=f"ranks by {selection.strategy}")
    for name in (
        "expert",
        "rank",
        "extra params",
        "energy kept" if selection.strategy.startswith("energy") else "score",
    ):
        table.add_column(name, justify="left" if name == "expert" else "right")
    for c in selection.choices:
        table.add_row(c.expert, rank_label(c.rank), fmt(c.params), fmt(c.score))
    total = selection.total_params
    budget = f" (budget {fmt(selection.budget)})" if selection.budget is not None else ""
    scores = [c.score for c in selection.choices if c.score is not None]
    summed = fmt(sum(scores)) if selection.budget is not None and scores else ""
    table.add_row("[bold]total", "", f"[bold]{fmt(total)}{budget}", summed)
    out.print(table)
    for note in selection.notes:
        console.print(f"note: {note}")
    args = selection.compose_args(folders)
    if args:
        command = ["flexmore", "compose", "--public", public, *args, "--out", "MIXTURE"]
        out.print(shlex.join(command), soft_wrap=True, highlight=False)
    else:
        specs = " ".join(
            f"--expert {c.expert}=DIR@{c.rank}" if c.rank is not None else f"--expert {c.expert}=CHECKPOINT#INDEX"
            for c in selection.choices
        )
        out.print(f"compose arguments: {specs}", soft_wrap=True, highlight=False)
