"""`flexmore analyze`: rank sensitivity, peak ranks and mixture tables (CSV, Markdown) and plots (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table as RichTable

from flexmore.cli.common import console, out, user_errors

if TYPE_CHECKING:
    from flexmore.analysis.tables import Table


def analyze_command(
    results: Annotated[Path, typer.Option(help="A results store (results.jsonl) from `flexmore sweep` / `eval`.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the CSV, Markdown and PNG files.")],
    plots: Annotated[bool, typer.Option(help="Draw the PNG plots (matplotlib).")] = True,
    baseline: Annotated[str, typer.Option(help="The mixture that Delta% compares against.")] = "flexolmo",
) -> None:
    """Fit s(r) = alpha + beta log2 r per expert and group (Pearson r, n), find peak ranks with their
    median and IQR across experts, tabulate the mixtures against the baseline, and plot it all."""
    from flexmore.analysis.scores import point_scores
    from flexmore.analysis.tables import write_report_tables
    from flexmore.evaluation.store import ResultStore

    with user_errors():
        if not results.is_file():
            raise FileNotFoundError(f"{results}: no such results store")
        points = point_scores(ResultStore(results).records())
        tables = write_report_tables(points, out_dir, baseline)
        pngs = []
        if plots:
            from flexmore.analysis.plots import plot_all

            pngs = plot_all(points, out_dir, baseline)
    for t in tables:
        _print(t)
    console.print(f"wrote {len(tables)} tables (CSV + report.md) and {len(pngs)} plots to {out_dir}")


def _print(t: Table) -> None:
    table = RichTable(title=t.title)
    for i, c in enumerate(t.columns):
        table.add_column(c, justify="left" if i == 0 or c in ("group", "note", "mixture") else "right", overflow="fold")
    for row in t.formatted():
        table.add_row(*row)
    out.print(table)
    for note in t.notes:
        out.print(f"  note: {note}")
