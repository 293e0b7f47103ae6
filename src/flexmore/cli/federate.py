"""`flexmore federate`: every data owner trains its expert on Flower, the server composes the mixture."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from flexmore.cli.common import console, fail, user_errors
from flexmore.cli.common import out as stdout

EMBEDDED = ("code", "docs", "math", "facts")  # flexmore.training.corpus.DOMAINS, without importing it


def _default_node_data(n: int) -> str:
    if n > len(EMBEDDED):
        raise ValueError(f"--node-data is needed for more than {len(EMBEDDED)} nodes (one data source per node)")
    return ",".join(f"{i}=embedded:{EMBEDDED[i]}" for i in range(n))


def _echo(line: str) -> None:
    typer.echo(line, err=True)


def federate_command(
    public: Annotated[str, typer.Option(help="The public FlexOlmo checkpoint (from `flexmore pretrain`).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output: experts/, mixture/, federation.json, messages.jsonl.")
    ],
    simulation: Annotated[
        int | None, typer.Option(help="Run N simulated SuperNodes on Flower's simulation engine (Ray).")
    ] = None,
    deployment: Annotated[
        bool, typer.Option("--deployment", help="Run a SuperLink and one SuperNode per --node-data entry on 127.0.0.1.")
    ] = False,
    node_data: Annotated[
        str | None,
        typer.Option(help="Each node's data: '0=embedded:code,1=embedded:math' (default: the embedded domains)."),
    ] = None,
    node_public: Annotated[
        str | None, typer.Option(help="Nodes holding their own copy of the public model: '1=/path/to/copy'.")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Low-rank experts of this rank (default: full experts).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps per expert.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    eval_batches: Annotated[int | None, typer.Option(help="Held-out batches per evaluation.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the weights, batch order and held-out split.")] = None,
    max_docs: Annotated[int | None, typer.Option(help="Each owner uses its first N documents only.")] = None,
    router_docs: Annotated[
        int | None, typer.Option(help="Documents whose mean MoE input starts the router row.")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Active experts per token in the mixture.")] = None,
    wait_nodes: Annotated[float, typer.Option(help="Seconds to wait for every node to connect.")] = 300.0,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for replies; later ones are failures.")
    ] = 3600.0,
    client_cpus: Annotated[
        int | None, typer.Option(help="Simulation: whole CPUs Ray reserves per client (Flower's default: 2).")
    ] = None,
) -> None:
    """Train one expert per data owner in isolation on Flower (the FlexOlmo recipe: the public model frozen,
    the owner's data never sent) and compose them into a FlexMoRE mixture. A rerun with the same --out
    resumes: experts already received are kept and their owners are not asked again."""
    with user_errors():
        if (simulation is None) == (not deployment):
            raise ValueError("give exactly one of --simulation N or --deployment")
        if simulation is not None and simulation < 1:
            raise ValueError(f"--simulation must be a positive number of nodes, got {simulation}")
        try:
            from flexmore.federated.config import FederateConfig, federated_train_default, parse_node_map
            from flexmore.federated.runner import FederationError, run_deployment, run_simulation
        except ImportError as err:
            raise ValueError(f"federate needs Flower: pip install 'flexmore[federated]' ({err})") from err

        mapping = parse_node_map(node_data or _default_node_data(simulation or len(EMBEDDED)))
        given = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "warmup": warmup}
        given |= {"eval_batches": eval_batches, "seed": seed}
        train_overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        base = federated_train_default()
        if "steps" in train_overrides and "warmup" not in train_overrides:
            train_overrides["warmup"] = min(base.warmup, train_overrides["steps"] // 10)  # below a short run
        config = FederateConfig(
            public=str(Path(public).expanduser().resolve()) if Path(public).expanduser().exists() else public,
            out=out,
            node_data=mapping,
            node_public=parse_node_map(node_public or "", "--node-public"),
            rank=rank,
            train=replace(base, **train_overrides),
            max_docs=max_docs,
            wait_nodes_s=wait_nodes,
            round_timeout_s=round_timeout,
            top_k=top_k,
        )
        if router_docs is not None:
            config = replace(config, router_docs=router_docs)
        try:
            if simulation is not None:
                result = run_simulation(config, simulation, echo=_echo, client_cpus=client_cpus)
            else:
                result = run_deployment(config, echo=_echo)
        except FederationError as err:
            fail("federation failed", err)

    report = result.report
    for node in report["nodes"]:
        who = node["name"] or f"node {node['node_id']}"
        if node["status"] == "received":
            m = node["metrics"]
            stdout.print(
                f"{who}: received, {node['bytes_received']:,} bytes; held-out loss "
                f"{m.get('loss-before', float('nan')):.4f} -> {m.get('loss-after', float('nan')):.4f}",
                highlight=False,
            )
        elif node["status"] == "skipped":
            stdout.print(f"{who}: already received in an earlier run, skipped", highlight=False)
        else:
            console.print(
                f"[yellow]{escape(who)}: left out[/yellow]: {escape(str(node['reason']))}",
                highlight=False,
                soft_wrap=True,
            )
    b = report["bytes"]
    stdout.print(
        f"bytes sent {b['sent']:,}, received {b['received']:,}; {len(report['experts'])} expert(s) in the mixture; "
        f"{result.seconds:.1f}s; report {Path(report['config']['out']) / 'federation.json'}",
        highlight=False,
    )
    if report.get("mixture") is None:
        fail("no mixture", report.get("error"))
    stdout.print(f"mixture -> {report['mixture']}", highlight=False)
