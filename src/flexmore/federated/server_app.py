"""The server's side (a Flower ServerApp): read the run config, run the expert round (`coordinator`)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .config import FederateConfig
from .coordinator import Round

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # compose/save print their own; keep the run log readable
    Round(FederateConfig.from_run_config(context.run_config), grid).run()
