"""What a federation run is told: the run config (server side), the training request (server -> client)
and a node's own settings (node config). Plain dataclasses, validated at the boundary; no Flower here.

Flower carries configs as flat TOML scalars (no None), so "unset" travels as 0 or "" and is turned
back into None here, in one place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flexmore.training.loop import TrainConfig

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # the names compose accepts (`NAME=DIR`)
# TrainConfig fields a federation run sets; the rest keep their defaults.
TRAIN_KEYS: tuple[str, ...] = (
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "warmup",
    "grad_accum",
    "weight_decay",
    "eval_batches",
    "seed",
    "dtype",
)


def federated_train_default() -> TrainConfig:
    # `train-expert`'s defaults (flexmore.training.expert.default_expert_train), evaluated at the end only.
    return TrainConfig(steps=80, batch_size=16, seq_len=256, lr=2e-3, warmup=8, eval_every=0, eval_batches=16)


def parse_node_map(text: str, what: str = "node-data") -> dict[int, str]:
    """`"0=embedded:code,1=embedded:math"` -> {0: "embedded:code", 1: "embedded:math"}."""
    out: dict[int, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isdigit() or not value.strip():
            raise ValueError(f"{what}: expected INDEX=VALUE[,INDEX=VALUE...], got {item!r} in {text!r}")
        index = int(key)
        if index in out:
            raise ValueError(f"{what}: node {index} is given twice in {text!r}")
        out[index] = value.strip()
    return out


def format_node_map(mapping: Mapping[int, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(mapping.items()))


def expert_name_for(data: str) -> str:
    """The default expert name of a data source, as `train-expert` derives it ("embedded:math" -> "math")."""
    text = data.split(":", 1)[1] if data.startswith("embedded:") else Path(data.rstrip("/")).stem
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text) or "expert"


def check_name(name: str, where: str) -> str:
    if not _NAME.match(name) or name == "public":
        raise ValueError(f"{where}: expert name must match [A-Za-z0-9_.-]+ and not be 'public', got {name!r}")
    return name


@dataclass(frozen=True)
class FederateConfig:
    """One federation run: every owner trains one expert against `public`; the server composes them."""

    public: str  # the public FlexOlmo checkpoint folder, as the server sees it
    out: Path  # experts/, mixture/, federation.json, messages.jsonl
    node_data: dict[int, str] = field(default_factory=dict)  # node index -> data source (simulation; deployment)
    node_public: dict[int, str] = field(default_factory=dict)  # node index -> that node's own copy of `public`
    rank: int | None = None  # None: full experts; R: low-rank experts of rank R
    train: TrainConfig = field(default_factory=federated_train_default)
    max_docs: int | None = None
    router_docs: int = 256
    heldout_fraction: float = 0.05
    min_nodes: int = 1  # the round starts when this many nodes are connected
    wait_nodes_s: float = 300.0  # ... or fails after this long
    round_timeout_s: float = 3600.0  # replies not in by then are reported as failures
    top_k: int | None = None  # of the composed mixture (None: the public config's)
    run_token: str = ""  # set by the launcher; the report echoes it so the launcher knows it is this run's

    def __post_init__(self) -> None:
        owner = "FederateConfig"
        if not self.public:
            raise ValueError(f"{owner}.public must name the public checkpoint folder")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"{owner}.rank must be a positive int or None (full experts), got {self.rank!r}")
        if self.max_docs is not None and self.max_docs < 2:
            raise ValueError(f"{owner}.max_docs must be >= 2 or None, got {self.max_docs!r}")
        if isinstance(self.router_docs, bool) or not isinstance(self.router_docs, int) or self.router_docs < 1:
            raise ValueError(f"{owner}.router_docs must be a positive int, got {self.router_docs!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"{owner}.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        if isinstance(self.min_nodes, bool) or not isinstance(self.min_nodes, int) or self.min_nodes < 1:
            raise ValueError(f"{owner}.min_nodes must be a positive int, got {self.min_nodes!r}")
        for name in ("wait_nodes_s", "round_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{owner}.{name} must be a positive number of seconds, got {value!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"{owner}.top_k must be a positive int or None, got {self.top_k!r}")
        names: dict[str, int] = {}
        for index, data in sorted(self.node_data.items()):
            name = check_name(expert_name_for(data), f"{owner}.node_data[{index}] ({data!r})")
            if name in names:
                raise ValueError(
                    f"{owner}.node_data: nodes {names[name]} and {index} would both train expert {name!r}; "
                    "give each owner a differently named data source"
                )
            names[name] = index
        unknown = sorted(set(self.node_public) - set(self.node_data))
        if unknown:
            raise ValueError(f"{owner}.node_public names nodes {unknown} that node_data does not")

    # -- the run config: flat TOML scalars ---------------------------------------------------
    def to_run_config(self) -> dict[str, str | int | float | bool]:
        train = asdict(self.train)
        return {
            "public": str(self.public),
            "out": str(Path(self.out).resolve()),
            "node-data": format_node_map(self.node_data),
            "node-public": format_node_map(self.node_public),
            "rank": self.rank or 0,
            **{k.replace("_", "-"): train[k] for k in TRAIN_KEYS},
            "max-docs": self.max_docs or 0,
            "router-docs": self.router_docs,
            "heldout-fraction": self.heldout_fraction,
            "min-nodes": self.min_nodes,
            "wait-nodes-s": float(self.wait_nodes_s),
            "round-timeout-s": float(self.round_timeout_s),
            "top-k": self.top_k or 0,
            "run-token": self.run_token,
        }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederateConfig:
        def get(key: str) -> Any:
            if key not in run_config:
                raise ValueError(f"run config has no {key!r} (is the app project out of date?)")
            return run_config[key]

        train = replace(federated_train_default(), **{k: get(k.replace("_", "-")) for k in TRAIN_KEYS})
        return cls(
            public=str(get("public")),
            out=Path(str(get("out"))),
            node_data=parse_node_map(str(get("node-data"))),
            node_public=parse_node_map(str(get("node-public")), "node-public"),
            rank=int(get("rank")) or None,
            train=train,
            max_docs=int(get("max-docs")) or None,
            router_docs=int(get("router-docs")),
            heldout_fraction=float(get("heldout-fraction")),
            min_nodes=int(get("min-nodes")),
            wait_nodes_s=float(get("wait-nodes-s")),
            round_timeout_s=float(get("round-timeout-s")),
            top_k=int(get("top-k")) or None,
            run_token=str(get("run-token")),
        )

    def request(self, public_sha256: str, skip: list[str]) -> TrainRequest:
        return TrainRequest(
            public=str(self.public),
            public_sha256=public_sha256,
            rank=self.rank,
            train=self.train,
            max_docs=self.max_docs,
            router_docs=self.router_docs,
            heldout_fraction=self.heldout_fraction,
            skip=tuple(skip),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"out": str(self.out)}


@dataclass(frozen=True)
class TrainRequest:
    """What the server sends each node: the public model's identity and the training recipe. Never data."""

    public: str  # the server's path of the public model; a node may hold its own copy elsewhere
    public_sha256: str  # flexmore.storage.fingerprint(public_digest(...)) of the server's copy
    rank: int | None
    train: TrainConfig
    max_docs: int | None
    router_docs: int
    heldout_fraction: float
    skip: tuple[str, ...] = ()  # experts the server already holds (a resumed run): do not train them again

    def to_record(self) -> dict[str, Any]:
        train = asdict(self.train)
        return {
            "public": self.public,
            "public-sha256": self.public_sha256,
            "rank": self.rank or 0,
            **{k.replace("_", "-"): train[k] for k in TRAIN_KEYS},
            "max-docs": self.max_docs or 0,
            "router-docs": self.router_docs,
            "heldout-fraction": self.heldout_fraction,
            "skip": list(self.skip),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainRequest:
        missing = sorted({"public", "public-sha256", "rank", "skip"} - set(record))
        if missing:
            raise ValueError(f"training request lacks {missing}")
        train = replace(federated_train_default(), **{k: record[k.replace("_", "-")] for k in TRAIN_KEYS})
        return cls(
            public=str(record["public"]),
            public_sha256=str(record["public-sha256"]),
            rank=int(record["rank"]) or None,
            train=train,
            max_docs=int(record["max-docs"]) or None,
            router_docs=int(record["router-docs"]),
            heldout_fraction=float(record["heldout-fraction"]),
            skip=tuple(str(s) for s in record["skip"]),
        )


@dataclass(frozen=True)
class NodeSpec:
    """A data owner's own settings: from its SuperNode's `--node-config` (deployment), or from the run
    config's `node-data` / `node-public` at its `partition-id` (simulation, where nodes have no config)."""

    data: str  # the owner's documents (any `load_texts` source); read only on the node
    name: str
    public: str | None = None  # this node's copy of the public model (default: the path the server sent)
    device: str = "cpu"

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> NodeSpec:
        if "data" in node_config:
            data = str(node_config["data"])
            public = str(node_config["public"]) if node_config.get("public") else None
            where = "node config"
        elif "partition-id" in node_config:
            index = int(node_config["partition-id"])
            mapping = parse_node_map(str(run_config.get("node-data", "")))
            if index not in mapping:
                raise ValueError(f"node {index}: the run config's node-data has no entry for it ({mapping})")
            data = mapping[index]
            public = parse_node_map(str(run_config.get("node-public", "")), "node-public").get(index)
            where = f"node-data[{index}]"
        else:
            raise ValueError('this SuperNode has no data: start it with --node-config \'data="SOURCE" name="NAME"\'')
        name = check_name(str(node_config.get("name") or expert_name_for(data)), where)
        return cls(data=data, name=name, public=public, device=str(node_config.get("device", "cpu")))
