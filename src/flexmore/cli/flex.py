"""`flexmore flex`: federated fine-tuning of a pretrained MoE LLM on Flower (FLEx, or a baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmore.cli.common import fail, user_errors
from flexmore.cli.common import out as stdout


def _echo(line: str) -> None:
    typer.echo(line, err=True)


def flex_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: checkpoint/, clients/, metrics.jsonl, report.")],
    model: Annotated[
        str,
        typer.Option(
            help="A pretrained MoE (Qwen2-MoE, OLMoE, Mixtral, FlexOlmo) folder or Hub id; "
            "'embedded': a tiny Qwen2-MoE pretrained here on first use."
        ),
    ] = "embedded",
    data: Annotated[
        str, typer.Option(help="'embedded' (generated tasks), a Dolly-style JSONL, or databricks/databricks-dolly-15k.")
    ] = "embedded",
    partition: Annotated[str, typer.Option(help="pathological | iid | dirichlet:ALPHA")] = "pathological",
    clients: Annotated[int, typer.Option(help="Number of clients (data owners).")] = 4,
    rounds: Annotated[int, typer.Option(help="Federated rounds (a rerun with the same --out resumes).")] = 3,
    method: Annotated[str, typer.Option(help="flex | flex-nogate | fedavg | fedprox | fedavgm | local")] = "flex",
    graft_width: Annotated[
        int | None, typer.Option(help="Intermediate channels of each grafted expert (default: half).")
    ] = None,
    graft_k: Annotated[int, typer.Option(help="Grafted experts per layer.")] = 1,
    shared: Annotated[str, typer.Option(help="What FLEx aggregates: lora (attention LoRA) or dense.")] = "lora",
    local_steps: Annotated[int | None, typer.Option(help="Optimizer steps per client per round.")] = None,
    lr: Annotated[float | None, typer.Option(help="Local learning rate.")] = None,
    families: Annotated[str | None, typer.Option(help="Embedded data: comma-separated task families.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data, partition, adapters and batches.")] = 0,
    simulation: Annotated[bool, typer.Option("--simulation", help="Flower's simulation engine (Ray).")] = False,
    deployment: Annotated[
        bool, typer.Option("--deployment", help="A SuperLink and one SuperNode per client on 127.0.0.1.")
    ] = False,
    client_cpus: Annotated[int | None, typer.Option(help="Simulation: whole CPUs Ray reserves per client.")] = None,
) -> None:
    """Clients fine-tune a pretrained MoE together: experts and routers stay frozen, only the shared
    (non-expert) adapters travel and are averaged, and each client grafts a pruned copy of its best-matching
    expert per layer behind a sigmoid gate. Writes per-round metrics, a checkpoint each round, each client's
    personal parts and a report."""
    with user_errors():
        if simulation == deployment:
            raise ValueError("give exactly one of --simulation or --deployment")
        try:
            from flexmore.federated.flex_runner import run_flex_deployment, run_flex_simulation
            from flexmore.federated.runner import FederationError
        except ImportError as err:
            raise ValueError(f"flex needs Flower: pip install 'flexmore[federated]' ({err})") from err
        from flexmore.flex.config import FlexConfig
        from flexmore.flex.pretrain import resolve_model

        options: dict[str, object] = {"graft_width": graft_width, "local_steps": local_steps, "lr": lr,
                                      "families": families}  # fmt: skip
        config = FlexConfig(
            model=resolve_model(model, _echo),
            out=out,
            data=data,
            partition=partition,
            clients=clients,
            rounds=rounds,
            method=method,
            graft_k=graft_k,
            shared=shared,
            seed=seed,
            **{k: v for k, v in options.items() if v is not None},  # type: ignore[arg-type]
        )
        try:
            if simulation:
                result = run_flex_simulation(config, echo=_echo, client_cpus=client_cpus)
            else:
                result = run_flex_deployment(config, echo=_echo)
        except FederationError as err:
            fail("flex failed", err)
    report = result.report
    if report.get("error"):
        fail("flex failed", report["error"])
    from flexmore.flex.report import table

    stdout.print(table([report["summary"]]), highlight=False)
    stdout.print(f"{result.seconds:.1f}s; report {Path(out) / 'report.md'}", highlight=False)
