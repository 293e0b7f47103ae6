"""The `flexmore` command: thin typer commands over the library."""

from flexmore.cli.app import app, main

__all__ = ["app", "main"]
