"""Launchers: a federation on Flower's simulation engine (Ray, one machine) or as a loopback deployment
(a SuperLink and one SuperNode per data owner as real processes on 127.0.0.1), both through `flwr run`.

Everything Flower writes goes under OUT/.flower/: the app project (a pyproject.toml naming our ServerApp
and ClientApp, generated here so that `flwr run` never edits a file of ours), the run config, a private
FLWR_HOME per process and their logs. Flower 1.42 keeps SuperLink connections in FLWR_HOME/config.toml,
not in the app's pyproject (it would migrate and comment out a `[tool.flwr.federations]` table there).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import tomli_w

from flexmore.storage import FlexOlmoCheckpoint, atomic_write_text, resolve_source

from .config import FederateConfig, expert_name_for
from .coordinator import REPORT
from .processes import ProcessGroup, Started, free_port, wait_http

CONNECTION = "flexmore"
APP_NAME = "flexmore-federate"
# The environment every Flower process here gets (printed with the commands, to rerun them by hand).
FLOWER_VARS = (
    "FLWR_HOME",
    "FLWR_DISABLE_UPDATE_CHECK",
    "FLWR_TELEMETRY_ENABLED",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
)
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class LaunchConfig(Protocol):
    """What the launcher needs of a run's config: FederateConfig's, or FLEx's."""

    @property
    def out(self) -> Path | str: ...
    @property
    def run_token(self) -> str: ...
    @property
    def wait_nodes_s(self) -> float: ...
    @property
    def round_timeout_s(self) -> float: ...
    def to_run_config(self) -> dict[str, str | int | float | bool]: ...


class FederationError(RuntimeError):
    """The federation did not produce its report; the message says where to look."""


@dataclass
class FederationResult:
    report: dict[str, Any]
    seconds: float
    commands: list[str]
    run_id: str | None
    logs: Path
    stopped_pids: list[int] = field(default_factory=list)


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # flower-superlink etc. spawn `flower-superexec` by name
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # else every run reinstalls the app's deps
    env["PYTHONUNBUFFERED"] = "1"
    # Everything is on loopback: never through a proxy from the environment.
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, ["127.0.0.1", "localhost", env.get("NO_PROXY", "")]))
    return env


COMPONENTS = {"serverapp": "flexmore.federated.server_app:app", "clientapp": "flexmore.federated.client_app:app"}


def app_project(defaults: dict[str, Any], components: dict[str, str] | None = None) -> str:
    """The Flower app's pyproject.toml. Its run config declares every key (`--run-config` may only
    override declared keys); the components are our installed modules, so the bundle is this file alone."""
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": APP_NAME,
            "version": "1.0.0",
            "description": "flexmore: experts trained in isolation on Flower, composed into a FlexMoRE mixture",
            "license": "Apache-2.0",
            "dependencies": [],  # flexmore[federated] must be installed where the app runs
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "flexmore",
                    "components": components or COMPONENTS,
                    "config": defaults,
                }
            }
        },
    }
    return tomli_w.dumps(project)


def _node_config(items: dict[str, str]) -> str:
    """`--node-config` text: Flower splits on spaces outside quotes and reads each value as TOML."""
    parts = []
    for key, value in items.items():
        if '"' in value or "\\" in value or "\n" in value:
            raise ValueError(f"node config {key}={value!r}: quotes, backslashes and newlines are not supported")
        parts.append(f'{key}="{value}"')
    return " ".join(parts)


class _Workspace:
    """OUT/.flower: app project, run config, Flower homes, logs."""

    def __init__(self, config: LaunchConfig, components: dict[str, str] | None = None) -> None:
        self.root = Path(config.out).resolve() / ".flower"
        self.app = self.root / "app"
        self.logs = self.root / "logs"
        self.home = self.root / "home"
        for folder in (self.app, self.logs, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        defaults = config.to_run_config() | {
            "public": "",
            "out": "",
            "run-token": "",
            "node-data": "",
            "node-public": "",
        }
        atomic_write_text(self.app / "pyproject.toml", app_project(defaults, components))
        self.run_config = self.root / "run_config.toml"
        atomic_write_text(self.run_config, tomli_w.dumps(config.to_run_config()))

    def connect(self, port: int) -> None:
        text = tomli_w.dumps(
            {"superlink": {"default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}}
        )
        atomic_write_text(self.home / "config.toml", text)


def _prepare(config: FederateConfig) -> FederateConfig:
    """Fail here, before any process starts, on what the ServerApp would only find later."""
    # Reads config.json and the tensor index only; hashing it (the ServerApp does) costs minutes at 7B.
    FlexOlmoCheckpoint(resolve_source(config.public))
    Path(config.out).mkdir(parents=True, exist_ok=True)
    return replace(config, out=Path(config.out).resolve(), run_token=uuid.uuid4().hex)


def _superlink(port: int, simulation: bool) -> list[str]:
    argv = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--disable-runtime-dependency-installation"]
    return argv + (["--simulation"] if simulation else [])


def _flwr_run(ws: _Workspace, federation_config: str | None) -> list[str]:
    argv = ["flwr", "run", str(ws.app), CONNECTION, "--run-config", str(ws.run_config), "--stream"]
    return argv + (["--federation-config", federation_config] if federation_config else [])


def run_simulation(
    config: FederateConfig, num_nodes: int, echo: Callable[[str], None] | None = None, client_cpus: int | None = None
) -> FederationResult:
    """`num_nodes` simulated SuperNodes on Ray; node i trains on `config.node_data[i]`."""
    missing = sorted(set(range(num_nodes)) - set(config.node_data))
    if missing:
        raise ValueError(f"--simulation {num_nodes}: node-data has no entry for nodes {missing}")
    config = _prepare(replace(config, min_nodes=num_nodes))
    return _launch(config, simulation=True, federation_config=simulation_federation(num_nodes, client_cpus),
                   nodes={}, echo=echo)  # fmt: skip


def simulation_federation(num_nodes: int, client_cpus: int | None) -> str:
    """`flwr run --federation-config` for the simulation engine."""
    federation = f"num-supernodes={num_nodes}"
    if client_cpus is not None:
        # Flower 1.42 carries it as an int (federation_config.proto): "1.0" or "0.5" fail inside `flwr run`.
        if isinstance(client_cpus, bool) or not isinstance(client_cpus, int) or client_cpus < 1:
            raise ValueError(f"client CPUs must be a positive whole number, got {client_cpus!r}")
        federation += f" client-resources-num-cpus={client_cpus}"
    return federation


def deployment_nodes(config: FederateConfig) -> dict[int, dict[str, str]]:
    """Each node's `--node-config`: its data, its expert's name and, if given, its own public copy."""
    nodes: dict[int, dict[str, str]] = {}
    for index, data in sorted(config.node_data.items()):
        items = {"data": data, "name": expert_name_for(data)}
        if index in config.node_public:
            items["public"] = config.node_public[index]
        nodes[index] = items
    return nodes


def run_deployment(config: FederateConfig, echo: Callable[[str], None] | None = None) -> FederationResult:
    """A SuperLink and one SuperNode per `config.node_data` entry, as processes on 127.0.0.1."""
    if not config.node_data:
        raise ValueError("--deployment needs --node-data: one SuperNode per data owner")
    config = _prepare(replace(config, min_nodes=len(config.node_data)))
    return _launch(config, simulation=False, federation_config=None, nodes=deployment_nodes(config), echo=echo)


def _launch(
    config: LaunchConfig,
    *,
    simulation: bool,
    federation_config: str | None,
    nodes: dict[int, dict[str, str]],
    echo: Callable[[str], None] | None,
    components: dict[str, str] | None = None,
    report_name: str = REPORT,
) -> FederationResult:
    """`components` names other ServerApp/ClientApp modules (FLEx's) and `report_name` the file their
    ServerApp writes."""
    say = echo or (lambda _line: None)
    start = time.perf_counter()
    ws = _Workspace(config, components)
    port = free_port()
    ws.connect(port)
    env = flower_env(ws.home)
    commands: list[str] = []
    group = ProcessGroup(ws.logs, env)
    try:
        commands.append("export " + " ".join(f"{k}={shlex.quote(env[k])}" for k in FLOWER_VARS))
        say(f"$ {commands[-1]}")
        argv = _superlink(port, simulation)
        commands.append(shlex.join(argv))
        say(f"$ {commands[-1]}")
        superlink = group.start("superlink", argv)
        wait_http(f"http://127.0.0.1:{port}/health", 60.0, superlink)
        for index, items in nodes.items():
            home = ws.root / f"node-{index}"
            home.mkdir(exist_ok=True)
            node_argv = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}"]
            node_argv += ["--host", "127.0.0.1", "--port", str(free_port()), "--node-config", _node_config(items)]
            commands.append(f"FLWR_HOME={shlex.quote(str(home))} {shlex.join(node_argv)}")
            say(f"$ {commands[-1]}")
            group.start(f"supernode-{index}", node_argv, env=env | {"FLWR_HOME": str(home)})
        argv = _flwr_run(ws, federation_config)
        commands.append(shlex.join(argv))
        say(f"$ {commands[-1]}")
        run = group.start("flwr-run", argv, pipe=True)
        run_id = _follow(run, say, config.wait_nodes_s + config.round_timeout_s + 600.0)
        report = _read_report(config, run, group, report_name)
    finally:
        stopped = group.stop()
    return FederationResult(report, time.perf_counter() - start, commands, run_id, ws.logs, stopped)


def _follow(run: Started, say: Callable[[str], None], timeout_s: float) -> str | None:
    """Copy `flwr run --stream`'s output to its log and `say` until it exits (the run has finished)."""
    found: list[str] = []

    def pump() -> None:
        assert run.process.stdout is not None
        with run.log.open("ab") as fh:
            for raw in run.process.stdout:
                fh.write(raw)
                fh.flush()
                line = raw.decode(errors="replace").rstrip()
                if (m := _RUN_ID.search(line)) is not None:
                    found.append(m.group(1))
                say(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        run.process.wait(timeout=timeout_s)
    except Exception as err:
        raise FederationError(f"the run did not finish within {timeout_s:.0f}s; logs in {run.log.parent}") from err
    reader.join(timeout=5)
    return found[0] if found else None


def _read_report(config: LaunchConfig, run: Started, group: ProcessGroup, name: str = REPORT) -> dict[str, Any]:
    path = Path(config.out) / name
    deadline = time.monotonic() + 10.0  # the stream can end a moment before the ServerApp's last write
    while time.monotonic() < deadline:
        if path.is_file():
            report: dict[str, Any] = json.loads(path.read_text())
            if report.get("run_token") == config.run_token:
                return report
        time.sleep(0.25)
    logs = "\n".join(f"--- {s.name} ({s.log})\n{s.tail(15)}" for s in group.started)
    raise FederationError(f"the ServerApp wrote no report for this run ({path}); the logs end with:\n{logs}")
