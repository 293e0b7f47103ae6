"""The command line: thin commands, clear errors, exit code 2 on bad input."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from flexmore.cli import app
from flexmore.lowrank.expert import load_expert
from flexmore.toy import save_tiny_flexolmo, tiny_config


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("extract", "params", "demo"):
        assert command in result.output
    # Option syntax in square brackets survives rich's markup (it once ate "[@RANK]").
    for command, syntax in (("compose", "NAME=DIR[@RANK]"), ("select", "budget:PARAMS[:GROUP]")):
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        assert syntax in result.output, command


def test_fail_keeps_bracketed_text_and_exits_1() -> None:
    import typer

    from flexmore.cli.common import fail

    probe = typer.Typer()

    @probe.command()
    def run() -> None:
        fail("federation failed", "see /runs/[fed]/superlink.log")

    result = CliRunner().invoke(probe, [], terminal_width=200)
    assert result.exit_code == 1
    assert "federation failed: see /runs/[fed]/superlink.log" in result.output


def test_extract_command(tmp_path: Path) -> None:
    save_tiny_flexolmo(tmp_path / "src", tiny_config(3))
    result = CliRunner().invoke(
        app,
        [
            "extract",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "x"),
            "--experts",
            "2,1",
            "--name",
            "math",
            "--name",
            "code",
            "--max-rank",
            "8",
            "--svd",
            "gram",
        ],
    )
    assert result.exit_code == 0, result.output
    math, code = load_expert(tmp_path / "x" / "math"), load_expert(tmp_path / "x" / "code")
    assert (math.meta.expert_index, code.meta.expert_index, math.rank) == (2, 1, 8)
    assert (tmp_path / "x" / "math" / "extract_config.json").is_file()


def test_extract_bad_input_is_a_message(tmp_path: Path) -> None:
    save_tiny_flexolmo(tmp_path / "src", tiny_config(3))
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(tmp_path / "src"), "--out", str(tmp_path / "x"), "--max-rank", "65"])
    assert result.exit_code == 2
    assert "max_rank must be in [1, 64]" in result.output
    result = runner.invoke(app, ["extract", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no such folder" in result.output
    result = runner.invoke(app, ["extract", str(tmp_path / "src"), "--out", str(tmp_path / "x"), "--svd", "qr"])
    assert result.exit_code == 2 and "svd must be one of" in result.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
