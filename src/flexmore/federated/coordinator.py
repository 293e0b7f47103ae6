"""The server's round: one training request per connected node, each reply saved as it arrives, the
failures reported and left out, then the mixture composed from every expert received (this run or an
earlier one). Talks to a Flower `Grid`; the ServerApp (`server_app`) only builds it.

Failure handling: an error reply (a ClientApp that raised, a refusal, a node the SuperLink declares
unavailable) or a reply that is not exactly an expert of the expected keys and shapes is a failure;
so is a node with no reply when `round_timeout_s` runs out (it disappeared, or is still training).
The others are kept. A rerun sends the names already saved as `skip`, so those owners do not train again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from flexmore.storage import atomic_write_text, resolve_source

from .config import FederateConfig, check_name
from .store import PublicModel, SavedExpert, compose_mixture, save_expert, saved_experts
from .wire import FULL, LOW_RANK, WireError, describe, expected_shapes, from_array_record, message_bytes, payload_bytes

REPORT = "federation.json"
MESSAGES = "messages.jsonl"
GROUP = "expert-round"
REPLY_RECORDS = {"expert", "metrics", "expert-info"}
INFO_KEYS = {"name", "kind", "rank"}


class GridLike(Protocol):
    """The part of `flwr.serverapp.Grid` the round uses (a fake in tests)."""

    def get_node_ids(self) -> Iterable[int]: ...
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...


@dataclass
class NodeOutcome:
    node_id: int
    status: str = "pending"  # received | skipped | failed
    name: str | None = None
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0


class MessageLog:
    """messages.jsonl: one line per message sent or received (bytes and what it carried, never values)."""

    def __init__(self, path: Path, run_token: str) -> None:
        self.path, self.run_token = path, run_token
        self.sent = self.received = 0

    def record(self, direction: str, node_id: int, message: Message, name: str | None = None) -> int:
        size = message_bytes(message)
        if direction == "sent":
            self.sent += size
        else:
            self.received += size
        line = {
            "run_token": self.run_token,
            "time": time.time(),
            "direction": direction,
            "node_id": node_id,
            "name": name,
            "message_type": message.metadata.message_type,
            "bytes": size,
            "payload_bytes": payload_bytes(message),
            **describe(message),
        }
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        return size


def connected_nodes(
    grid: GridLike,
    wanted: int,
    wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = 0.5,
) -> list[int]:
    """The connected node ids, sorted, as soon as `wanted` are there, or whatever is there at `wait_s`."""
    deadline = clock() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or clock() >= deadline:
            return nodes
        sleep(poll_s)


class Round:
    def __init__(
        self,
        config: FederateConfig,
        grid: GridLike,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 0.5,
    ) -> None:
        self.config, self.grid = config, grid
        self.clock, self.sleep, self.poll_s = clock, sleep, poll_s
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.messages = MessageLog(self.out / MESSAGES, config.run_token)
        self.outcomes: dict[int, NodeOutcome] = {}

    # -- the round ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The round; OUT/federation.json is written whatever happens (with `error` set if it failed)."""
        start = self.clock()
        public: PublicModel | None = None
        experts: dict[str, SavedExpert] = {}
        mixture: Path | None = None
        error: str | None = None
        try:
            public = PublicModel(resolve_source(self.config.public))
            saved = saved_experts(self.out, public.sha256)
            if saved:
                log(
                    INFO, "[flexmore] resuming: %d expert(s) already received: %s", len(saved), ", ".join(sorted(saved))
                )
            self._train(self._wait_for_nodes(), public, saved)
            experts = saved_experts(self.out, public.sha256)
            if not experts:
                error = "no expert was received: nothing to compose"
            else:
                mixture = compose_mixture(self.out, self.config.public, experts, self.config.top_k)
                log(INFO, "[flexmore] composed %d expert(s) + public -> %s", len(experts), mixture)
        except Exception as err:  # the report says why, then the run fails
            error = f"{type(err).__name__}: {err}"
            raise
        finally:
            report = self._report(public, experts, mixture, error, self.clock() - start)
            atomic_write_text(self.out / REPORT, json.dumps(report, indent=2) + "\n")
        return report

    def _wait_for_nodes(self) -> list[int]:
        wanted, wait_s = self.config.min_nodes, self.config.wait_nodes_s
        nodes = connected_nodes(self.grid, wanted, wait_s, self.clock, self.sleep, self.poll_s)
        if not nodes:
            raise RuntimeError(f"no SuperNode connected within {wait_s:.0f}s")
        if len(nodes) < wanted:
            log(WARNING, "[flexmore] only %d of %d nodes connected; going on", len(nodes), wanted)
        return nodes

    def _train(self, nodes: list[int], public: PublicModel, saved: dict[str, SavedExpert]) -> None:
        request = self.config.request(public.sha256, skip=sorted(saved)).to_record()
        ttl = self.config.round_timeout_s + 60.0
        messages = [
            Message(
                RecordDict({"config": ConfigRecord(request)}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=GROUP,
                ttl=ttl,
            )
            for node in nodes
        ]
        for node, message in zip(nodes, messages, strict=True):
            self.outcomes[node] = NodeOutcome(node, bytes_sent=self.messages.record("sent", node, message))
        ids = list(self.grid.push_messages(messages))
        pending: dict[str, int] = {}
        for node, mid in zip(nodes, ids, strict=True):
            if mid:
                pending[mid] = node
            else:
                self._fail(node, "the SuperLink did not accept the message")
        log(INFO, "[flexmore] sent training requests to %d node(s)", len(pending))
        deadline = self.clock() + self.config.round_timeout_s
        taken = set(saved)
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    self._receive(pending.pop(mid), reply, public, taken)
            if pending and self.clock() >= deadline:
                for node in pending.values():
                    self._fail(
                        node, f"no reply within {self.config.round_timeout_s:.0f}s (node gone or still training)"
                    )
                break
            if pending:
                self.sleep(self.poll_s)

    def _fail(self, node: int, reason: str) -> None:
        outcome = self.outcomes[node]
        outcome.status, outcome.reason = "failed", reason
        who = f"{outcome.name!r} (node {node})" if outcome.name else f"node {node}"
        log(WARNING, "[flexmore] %s left out: %s", who, reason)

    def _receive(self, node: int, reply: Message, public: PublicModel, taken: set[str]) -> None:
        outcome = self.outcomes[node]
        info = (
            dict(reply.content.config_records.get("expert-info", {}))
            if not reply.has_error() and reply.has_content()
            else {}
        )
        outcome.name = str(info["name"]) if "name" in info else None
        outcome.bytes_received = self.messages.record("received", node, reply, outcome.name)
        if reply.has_error():
            self._fail(node, f"error reply (code {reply.error.code}): {reply.error.reason}")
            return
        if info.get("status") == "skipped":
            outcome.status = "skipped"
            log(INFO, "[flexmore] %r (node %d): already received, skipped", outcome.name, node)
            return
        try:
            name = check_name(str(info.get("name", "")), f"node {node}")
            if name in taken:
                raise ValueError(f"expert name {name!r} is already taken by another node's expert")
            saved = self._save(name, info, reply, public)
        except (ValueError, KeyError, WireError) as err:
            self._fail(node, f"unusable reply: {err}")
            return
        taken.add(name)
        outcome.status = "received"
        outcome.metrics = {k: float(v) for k, v in reply.content.metric_records.get("metrics", {}).items()}  # type: ignore[arg-type]
        log(
            INFO,
            "[flexmore] %r (node %d): expert received (%s, %d bytes), held-out loss %.4f -> %.4f, saved to %s",
            name,
            node,
            saved.kind if saved.rank is None else f"rank {saved.rank}",
            outcome.bytes_received,
            outcome.metrics.get("loss-before", float("nan")),
            outcome.metrics.get("loss-after", float("nan")),
            saved.path,
        )

    def _save(self, name: str, info: dict[str, Any], reply: Message, public: PublicModel) -> SavedExpert:
        kind, rank = str(info.get("kind")), int(info.get("rank", 0)) or None
        wanted = FULL if self.config.rank is None else LOW_RANK
        if (kind, rank) != (wanted, self.config.rank):
            raise ValueError(f"asked for a {wanted} expert (rank {self.config.rank}), got {kind} (rank {rank})")
        records = set(reply.content.keys())
        if records != REPLY_RECORDS or not set(info) <= INFO_KEYS:
            # Anything beyond the expert, its metrics and its identity is refused, not stored.
            raise WireError(
                f"a reply carries exactly the records {sorted(REPLY_RECORDS)} (expert-info keys {sorted(INFO_KEYS)}); "
                f"got {sorted(records)} (expert-info keys {sorted(info)})"
            )
        tensors = from_array_record(reply.content["expert"], expected_shapes(kind, *public.dims, rank))  # type: ignore[arg-type]
        metrics = dict(reply.content.metric_records.get("metrics", {}))
        receipt = {"node_id": reply.metadata.src_node_id, "metrics": metrics, "run_token": self.config.run_token}
        return save_expert(self.out, name, kind, rank, tensors, public, receipt)

    def _report(
        self,
        public: PublicModel | None,
        experts: dict[str, SavedExpert],
        mixture: Path | None,
        error: str | None,
        seconds: float,
    ) -> dict[str, Any]:
        received_now = {o.name for o in self.outcomes.values() if o.status == "received"}
        return {
            "run_token": self.config.run_token,
            "public": self.config.public,
            "public_sha256": public.sha256 if public is not None else None,
            "config": self.config.to_dict(),
            "nodes": [asdict(o) for o in sorted(self.outcomes.values(), key=lambda o: (o.name or "", o.node_id))],
            "failed": sorted(
                f"{o.name or o.node_id}: {o.reason}" for o in self.outcomes.values() if o.status == "failed"
            ),
            "experts": {
                name: {"kind": e.kind, "rank": e.rank, "path": str(e.path), "this_run": name in received_now}
                for name, e in sorted(experts.items())
            },
            "bytes": {"sent": self.messages.sent, "received": self.messages.received},
            "mixture": str(mixture) if mixture is not None else None,
            "error": error,
            "seconds": seconds,
        }
