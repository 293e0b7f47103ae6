"""FLEx's server loop on a Flower Grid: each round sends the global shared tensors to every client,
aggregates the replies (`flexmore.flex.aggregate`), checkpoints the global state, and logs the round;
after the last round it asks every client to evaluate and writes the report.

    OUT/checkpoint/       global.safetensors + server.json: the state after the last completed round
    OUT/metrics.jsonl     one line per round (per-client training metrics, bytes) and one for evaluation
    OUT/flex.json         the report (the launcher waits for it); OUT/report.md and plots: flex.report

A rerun into the same OUT resumes after the checkpoint's round (clients reload their personal parts from
OUT/clients/). A reply that is an error, or whose arrays are not exactly the shared keys, is left out
of the round; a round with no usable reply fails the run.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flexmore.flex.aggregate import ServerState, load_checkpoint, save_checkpoint, server_update, weighted_mean
from flexmore.flex.config import FlexConfig
from flexmore.flex.report import write_report
from flexmore.flex.server import initial_shared
from flexmore.storage import atomic_write_text

from .coordinator import connected_nodes
from .wire import message_bytes, payload_bytes, to_array_record

REPORT, METRICS, CHECKPOINT = "flex.json", "metrics.jsonl", "checkpoint"


class FlexServer:
    def __init__(self, config: FlexConfig, grid: Grid) -> None:
        self.config, self.grid = config, grid
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def run(self) -> dict[str, Any]:
        start = time.monotonic()
        error: str | None = None
        evaluation: dict[int, dict[str, float]] = {}
        rounds: list[dict[str, Any]] = []
        try:
            state = self._start_state()
            nodes = self._wait_for_nodes()
            for server_round in range(state.round + 1, self.config.rounds + 1):
                state, line = self._round(nodes, state, server_round)
                rounds.append(line)
            evaluation = self._evaluate(nodes, state)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            raise
        finally:
            report = {
                "run_token": self.config.run_token,
                "config": self.config.to_dict(),
                "rounds_this_run": [r["round"] for r in rounds],
                "evaluation": {str(k): v for k, v in sorted(evaluation.items())},
                "error": error,
                "seconds": time.monotonic() - start,
            }
            if not error:
                report |= write_report(self.out, self.config, evaluation, self._all_rounds())
            atomic_write_text(self.out / REPORT, json.dumps(report, indent=2) + "\n")
        return report

    # -- state -------------------------------------------------------------------------------
    def _start_state(self) -> ServerState:
        saved = load_checkpoint(self.out / CHECKPOINT)
        if saved is None:
            tensors = {} if self.config.method == "local" else initial_shared(self.config)
            return ServerState(0, tensors)
        state, meta = saved
        if meta.get("method") != self.config.method or meta.get("model") != self.config.model:
            raise ValueError(
                f"{self.out / CHECKPOINT} is from method {meta.get('method')!r} on {meta.get('model')!r}; this run is "
                f"{self.config.method!r} on {self.config.model!r}: use another --out"
            )
        log(INFO, "[flex] resuming after round %d of %d", state.round, self.config.rounds)
        return state

    def _wait_for_nodes(self) -> list[int]:
        nodes = connected_nodes(self.grid, self.config.clients, self.config.wait_nodes_s)
        if len(nodes) < self.config.clients:
            raise RuntimeError(
                f"only {len(nodes)} of {self.config.clients} clients connected within {self.config.wait_nodes_s:.0f}s"
            )
        return nodes[: self.config.clients]

    # -- one round ---------------------------------------------------------------------------
    def _messages(self, nodes: list[int], state: ServerState, server_round: int, kind: str) -> list[Message]:
        arrays = to_array_record(state.tensors) if state.tensors else ArrayRecord()
        return [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                dst_node_id=node,
                message_type=kind,
                group_id=str(server_round),
            )
            for node in nodes
        ]

    def _round(self, nodes: list[int], state: ServerState, server_round: int) -> tuple[ServerState, dict[str, Any]]:
        started = time.monotonic()
        messages = self._messages(nodes, state, server_round, MessageType.TRAIN)
        sent = sum(message_bytes(m) for m in messages)
        sent_payload = sum(payload_bytes(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout_s))
        updates, clients, failed = [], [], []
        received = received_payload = 0
        expected = set(state.tensors)
        for reply in replies:
            received += message_bytes(reply)
            received_payload += payload_bytes(reply)
            if reply.has_error():
                failed.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            tensors = reply.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
            if set(tensors) != expected:
                # Only the shared keys may travel: anything else (an expert, a graft) is refused.
                failed.append(f"node {reply.metadata.src_node_id}: arrays {sorted(set(tensors) ^ expected)[:3]} "
                              "are not exactly the shared keys")  # fmt: skip
                continue
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
            updates.append((tensors, metrics["num-examples"]))
            clients.append(metrics)
        for reason in failed:
            log(WARNING, "[flex] round %d: left out %s", server_round, reason)
        if not updates:
            raise RuntimeError(f"round {server_round}: no usable reply ({'; '.join(failed) or 'no replies'})")
        if self.config.method == "local":
            new = ServerState(server_round, {})
        else:
            momentum = self.config.server_momentum if self.config.method == "fedavgm" else 0.0
            server_lr = self.config.server_lr if self.config.method == "fedavgm" else 1.0
            new = server_update(state, weighted_mean(updates), momentum=momentum, server_lr=server_lr)
        save_checkpoint(self.out / CHECKPOINT, new, {"method": self.config.method, "model": self.config.model})
        line = {
            "round": server_round,
            "method": self.config.method,
            "clients": sorted(clients, key=lambda m: m["client"]),
            "failed": failed,
            "bytes_sent": sent,
            "bytes_received": received,
            "payload_bytes_sent": sent_payload,
            "payload_bytes_received": received_payload,
            "seconds": time.monotonic() - started,
            "run_token": self.config.run_token,
        }
        with (self.out / METRICS).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        loss = sum(c["train-loss"] for c in clients) / len(clients)
        log(INFO, "[flex] round %d/%d: %d clients, train loss %.4f, %d bytes sent, %d received",
            server_round, self.config.rounds, len(clients), loss, sent, received)  # fmt: skip
        return new, line

    def _evaluate(self, nodes: list[int], state: ServerState) -> dict[int, dict[str, float]]:
        messages = self._messages(nodes, state, state.round, MessageType.EVALUATE)
        out: dict[int, dict[str, float]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.config.round_timeout_s):
            if reply.has_error():
                log(WARNING, "[flex] evaluation failed on node %d: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
            out[int(metrics["client"])] = metrics
        with (self.out / METRICS).open("a", encoding="utf-8") as fh:
            line = {"evaluation": {str(k): v for k, v in sorted(out.items())}, "round": state.round}
            fh.write(json.dumps(line | {"run_token": self.config.run_token}) + "\n")
        return out

    def _all_rounds(self) -> list[dict[str, Any]]:
        """Every round line in OUT/metrics.jsonl (this run and earlier ones), the latest per round."""
        rows: dict[int, dict[str, Any]] = {}
        path = self.out / METRICS
        if path.is_file():
            for text in path.read_text().splitlines():
                row = json.loads(text)
                if "evaluation" not in row:
                    rows[int(row["round"])] = row
        return [rows[r] for r in sorted(rows)]
