"""What every command shares: the console, progress bars, and turning library errors into messages."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
out = Console()


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar driven by the library's `progress(done, total, label)` callbacks."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[label]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, label=label)

        yield update


def fail(what: str, message: object) -> NoReturn:
    """A run that did not complete: its message (escaped: it names paths), exit code 1."""
    console.print(f"[red]{what}:[/red] {escape(str(message))}", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input ends the command with its message and exit code 2, not a traceback."""
    try:
        yield
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        # Unwrapped and unmarked-up: messages name files and tensors and must stay greppable.
        console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from err
