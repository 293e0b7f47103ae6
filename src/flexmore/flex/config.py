"""One FLEx run's settings, validated at the boundary; travels as flat TOML scalars in Flower's run config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .shared import METHODS
from .tasks import FAMILIES


@dataclass(frozen=True)
class FlexConfig:
    model: str  # a pretrained MoE checkpoint folder (or Hub id)
    out: Path
    data: str = "embedded"  # embedded | a Dolly-style JSONL | a Hub id (databricks/databricks-dolly-15k)
    partition: str = "pathological"  # pathological | iid | dirichlet:ALPHA
    families: str = ",".join(FAMILIES)  # embedded data: the task families to generate
    retention_data: str = "embedded:general"  # knowledge retention: held-out loss on this corpus's held-out split
    clients: int = 4
    rounds: int = 3
    method: str = "flex"  # flex | flex-nogate | fedavg | fedprox | fedavgm | local
    graft_width: int = 0  # intermediate channels of the grafted expert; 0: half the expert's
    graft_k: int = 1  # grafted experts per layer (the paper's costly extension)
    gate_bias: float = -2.0  # the gate's initial bias: sigmoid(-2) = 0.12
    shared: str = "lora"  # lora | dense: what FLEx aggregates
    lora_rank: int = 8
    lora_alpha: int = 16
    local_steps: int = 30
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    graft_lr: float = 3e-3
    prox_mu: float = 0.01  # FedProx
    server_momentum: float = 0.9  # FedAvgM
    server_lr: float = 1.0  # FedAvgM
    examples_per_family: int = 300
    heldout_per_client: int = 24  # held-out instructions per client (ROUGE-L)
    calibration_examples: int = 64
    max_new_tokens: int = 24
    retention_blocks: int = 16  # general-corpus held-out blocks for the knowledge-retention loss
    seed: int = 0
    device: str = "cpu"
    wait_nodes_s: float = 300.0  # the first round starts when every client is connected, or fails after this
    round_timeout_s: float = 1800.0  # replies not in by then are left out of the round
    run_token: str = ""  # set by the launcher; the report echoes it

    def __post_init__(self) -> None:
        owner = "FlexConfig"
        if self.method not in METHODS:
            raise ValueError(f"{owner}.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        positive = "clients rounds graft_k lora_rank lora_alpha local_steps batch_size examples_per_family"
        positive += " heldout_per_client calibration_examples max_new_tokens retention_blocks"
        for name in positive.split():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
        if isinstance(self.graft_width, bool) or not isinstance(self.graft_width, int) or self.graft_width < 0:
            raise ValueError(f"{owner}.graft_width must be a positive int (or 0: half width), got {self.graft_width!r}")
        if self.seq_len < 16:
            raise ValueError(f"{owner}.seq_len must be >= 16, got {self.seq_len!r}")
        if self.shared not in ("lora", "dense"):
            raise ValueError(f"{owner}.shared must be lora or dense, got {self.shared!r}")
        for name in ("lr", "graft_lr", "server_lr", "wait_nodes_s", "round_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{owner}.{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.gate_bias) or self.gate_bias == -math.inf):
            raise ValueError(f"{owner}.gate_bias must be finite or -inf, got {self.gate_bias!r}")
        if not 0 <= self.prox_mu < 1e3:
            raise ValueError(f"{owner}.prox_mu must be in [0, 1000), got {self.prox_mu!r}")
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"{owner}.server_momentum must be in [0, 1), got {self.server_momentum!r}")
        unknown = [f for f in self.families.split(",") if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(
                f"{owner}.families must be a comma-separated subset of {','.join(FAMILIES)}, got {self.families!r}"
            )
        if self.partition not in ("pathological", "iid") and not self.partition.startswith("dirichlet:"):
            raise ValueError(f"{owner}.partition must be pathological, iid or dirichlet:ALPHA, got {self.partition!r}")

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        d = asdict(self) | {"out": str(Path(self.out).resolve())}
        return {k.replace("_", "-"): v for k, v in d.items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlexConfig:
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                raise ValueError(f"run config has no {key!r} (is the app project out of date?)")
            values[f.name] = run_config[key]
        values["out"] = Path(str(values["out"]))
        for f in fields(cls):  # TOML gives ints for whole floats
            if f.type == "float":
                values[f.name] = float(values[f.name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"out": str(self.out)}
