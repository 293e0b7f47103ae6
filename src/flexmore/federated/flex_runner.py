"""Launch a FLEx run on Flower: a simulation (Ray) or a loopback deployment, through the same launcher
as the expert federation (`runner._launch`) with FLEx's ServerApp and ClientApp."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from flexmore.flex.config import FlexConfig

from .flex_coordinator import REPORT
from .runner import FederationResult, _launch, simulation_federation

COMPONENTS = {
    "serverapp": "flexmore.federated.flex_server_app:app",
    "clientapp": "flexmore.federated.flex_client_app:app",
}


def _prepare(config: FlexConfig) -> FlexConfig:
    Path(config.out).mkdir(parents=True, exist_ok=True)
    return replace(config, out=Path(config.out).resolve(), run_token=uuid.uuid4().hex)


def run_flex_simulation(
    config: FlexConfig, echo: Callable[[str], None] | None = None, client_cpus: int | None = None
) -> FederationResult:
    """`config.clients` simulated SuperNodes; node i is client i (its partition-id)."""
    config = _prepare(config)
    federation = simulation_federation(config.clients, client_cpus)
    return _launch(config, simulation=True, federation_config=federation, nodes={}, echo=echo,
                   components=COMPONENTS, report_name=REPORT)  # fmt: skip


def run_flex_deployment(config: FlexConfig, echo: Callable[[str], None] | None = None) -> FederationResult:
    """A SuperLink and one SuperNode per client (node-config partition-id=i) on 127.0.0.1."""
    config = _prepare(config)
    nodes = {i: {"partition-id": str(i)} for i in range(config.clients)}
    return _launch(config, simulation=False, federation_config=None, nodes=nodes, echo=echo,
                   components=COMPONENTS, report_name=REPORT)  # fmt: skip
