"""`flexmore params`: parameters and FFN FLOPs of a FlexMoRE mixture, from a config alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flexmore.cli.common import out, user_errors

if TYPE_CHECKING:
    from flexmore.analysis.params import ParamReport


def read_config(path: str) -> dict[str, Any]:
    """config.json, or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such config.json or folder")
    try:
        data: dict[str, Any] = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from err
    return data


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def params_command(
    config: Annotated[str, typer.Argument(help="A FlexOlmo config.json (or its folder): the dimensions.")],
    expert_ranks: Annotated[
        str, typer.Option(help="One entry per expert: 'full' or a rank, e.g. full,64,128,2048,1,8,128.")
    ],
    active: Annotated[int | None, typer.Option(help="Active experts per token K (default: the config's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Parameter counts of a FlexMoRE mixture (one or more full experts plus low-rank experts) and
    per-token FFN FLOPs at K active experts, counted on the meta device: no weights are read."""
    from flexmore.analysis.params import count, mixture_config, parse_ranks

    with user_errors():
        report = count(mixture_config(read_config(config), parse_ranks(expert_ranks), active))
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    _print(report)


def _print(r: ParamReport) -> None:
    table = Table(title=f"FlexMoRE mixture, {len(r.experts)} experts")
    table.add_column("part")
    table.add_column("rank")
    table.add_column("parameters", justify="right")
    table.add_column("", justify="right")
    table.add_row("non-expert (attention, embeddings, routers)", "", f"{r.non_expert:,}", _human(r.non_expert))
    for e, (n, rank) in enumerate(zip(r.experts, r.expert_ranks, strict=True)):
        table.add_row(f"expert {e}", "full" if rank is None else str(rank), f"{n:,}", _human(n))
    table.add_row("[bold]total", "", f"[bold]{r.total:,}", f"[bold]{_human(r.total)}")
    out.print(table)
    out.print(
        f"FFN FLOPs per token at {r.active} active: FlexOlmo (all full) {_human(r.flexolmo_ffn_flops)}, "
        f"FlexMoRE {_human(r.flexmore_ffn_flops_min)}-{_human(r.flexmore_ffn_flops_max)} "
        f"({r.flexmore_ffn_flops_max / r.flexolmo_ffn_flops:.2f}x at most)"
    )
