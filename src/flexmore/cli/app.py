"""Command registry. Each command lives in its own module and only parses, calls and prints."""

from __future__ import annotations

import sys

import typer

from flexmore.cli import analyze, compose, demo, extract, federate, params, train
from flexmore.cli import eval as eval_cli
from flexmore.cli import flex as flex_cmd
from flexmore.cli import select as select_cmd
from flexmore.cli import sweep as sweep_cli

app = typer.Typer(
    name="flexmore",
    help="Federated Mixture-of-Experts LLMs with rank-heterogeneous experts (FlexMoRE, FLEx).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("extract")(extract.extract_command)
app.command("params")(params.params_command)
app.command("compose")(compose.compose_command)
app.command("demo")(demo.demo_command)
app.command("pretrain")(train.pretrain_command)
app.command("train-expert")(train.train_expert_command)
app.command("federate")(federate.federate_command)
app.command("eval")(eval_cli.eval_command)
app.command("sweep")(sweep_cli.sweep_command)
app.command("flex")(flex_cmd.flex_command)
app.command("select")(select_cmd.select_command)
app.command("analyze")(analyze.analyze_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
