"""`flexmore eval`: benchmarks (embedded proxy groups, the paper's groups through lm-eval) and held-out
loss of one FlexMoRE or FlexOlmo checkpoint; results printed and appended to a results store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from flexmore.cli.common import console, out, progress_bar, user_errors

if TYPE_CHECKING:
    from flexmore.evaluation.runner import EvalConfig
    from flexmore.evaluation.store import Result

Tasks = Annotated[
    str,
    typer.Option(
        help="Comma list: embedded (code, docs, math, facts proxies; offline), paper (MC9, GEN5, AGIEval, BBH, "
        "MMLU, MMLU-Pro; lm-eval downloads them), a group name, or lm-eval task names.",
    ),
]
Limit = Annotated[int, typer.Option(help="Items per task (lm-eval --limit); 0: all.")]
Heldout = Annotated[bool, typer.Option(help="Also held-out loss, perplexity and token accuracy per embedded domain.")]
Include = Annotated[
    list[Path] | None, typer.Option("--include", help="A folder of local lm-eval task YAMLs. Repeatable.")
]
Seed = Annotated[int, typer.Option(help="The training seed: it picks the held-out documents (train-expert's split).")]
Cache = Annotated[Path | None, typer.Option(help="Where generated embedded task files go (default ~/.cache/flexmore).")]
BatchSize = Annotated[int, typer.Option(help="Sequences per model call.")]


def eval_config(
    tasks: str,
    limit: int,
    heldout: bool,
    include: Sequence[Path] | None,
    seed: int,
    cache: Path | None,
    batch_size: int,
    device: str = "cpu",
) -> EvalConfig:
    from flexmore.evaluation.embedded import EmbeddedConfig
    from flexmore.evaluation.runner import EvalConfig, default_cache

    return EvalConfig(
        tasks=tasks,
        limit=limit or None,
        heldout=heldout,
        include=tuple(include or ()),
        embedded=EmbeddedConfig(seed=seed),
        cache=cache or default_cache(),
        batch_size=batch_size,
        device=device,
    )


def results_table(results: Sequence[Result], title: str) -> Table:
    """Task rows, then group means and Avg; held-out rows with loss and perplexity."""
    from flexmore.evaluation.groups import HELDOUT_GROUP
    from flexmore.evaluation.runner import summarize

    table = Table(title=title, title_justify="left")
    for col in ("task", "group", "metric", "score", "n"):
        table.add_column(col, justify="right" if col in ("score", "n") else "left")
    bench = [r for r in results if r.group != HELDOUT_GROUP]
    for r in bench:
        table.add_row(r.task, r.group, r.metric, f"{r.score:.4f}", str(r.n))
    summary = summarize(results)
    if summary.groups:
        table.add_section()
        for group, score in summary.groups.items():
            table.add_row("[bold]mean[/bold]", group, "", f"{score:.4f}", "")
        if summary.avg is not None:
            table.add_row("[bold]Avg[/bold]", "", "", f"[bold]{summary.avg:.4f}[/bold]", "")
    held = [r for r in results if r.group == HELDOUT_GROUP]
    if held:
        table.add_section()
        for r in held:
            loss, ppl = r.extra.get("loss", float("nan")), r.extra.get("ppl", float("nan"))
            table.add_row(r.task, r.group, f"{r.metric} (loss {loss:.3f}, ppl {ppl:.1f})", f"{r.score:.4f}", str(r.n))
    return table


def eval_command(
    model: Annotated[Path, typer.Option(help="A FlexMoRE or FlexOlmo checkpoint folder.")],
    active: Annotated[int | None, typer.Option(help="Experts per token (default: the checkpoint's top-k).")] = None,
    tasks: Tasks = "embedded",
    heldout: Heldout = False,
    limit: Limit = 100,
    results: Annotated[Path | None, typer.Option(help="Results store (JSONL) to append to.")] = None,
    name: Annotated[str | None, typer.Option(help="Mixture name in the store (default: the folder name).")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer folder (default: the checkpoint's).")] = None,
    include: Include = None,
    seed: Seed = 0,
    cache: Cache = None,
    batch_size: BatchSize = 32,
) -> None:
    """Evaluate one mixture: task scores, group means and Avg (unweighted mean of group means). With
    --results, groups already stored for this (name, active) are not evaluated again."""
    from transformers.utils import logging as hf_logging

    from flexmore.evaluation.runner import evaluate_mixture, load_mixture, pending
    from flexmore.evaluation.store import ResultStore

    hf_logging.disable_progress_bar()
    with user_errors():
        config = eval_config(tasks, limit, heldout, include, seed, cache, batch_size)
        mixture, tok = load_mixture(model, tokenizer)
        k = active if active is not None else int(mixture.config.num_experts_per_tok)
        label = name or model.resolve().name
        store = ResultStore(results) if results is not None else None
        plan, want_heldout = pending(config.plan, store, (label, None, None, k), config.heldout)
        measured: list[Result] = []
        if plan.groups or want_heldout:
            with progress_bar("eval") as update:
                measured = evaluate_mixture(
                    mixture, tok, config, active=k, mixture=label, plan=plan, heldout=want_heldout, progress=update
                )
            if store is not None:
                store.append(measured)
        shown = measured
        if store is not None:
            shown = [r for r in store.records() if (r.mixture, r.expert, r.rank, r.active) == (label, None, None, k)]
            console.print(f"results: {store.path} ({len(measured)} new records)", soft_wrap=True)
    out.print(results_table(shown, f"{label} (active {k})"))
