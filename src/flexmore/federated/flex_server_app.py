"""FLEx's ServerApp: read the run config, run the rounds (`flex_coordinator`)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexmore.flex.config import FlexConfig

from .flex_coordinator import FlexServer

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    FlexServer(FlexConfig.from_run_config(context.run_config), grid).run()
