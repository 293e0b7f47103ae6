"""FLEx's ClientApp: one client's local round (`flexmore.flex.client`) behind Flower messages.

train:    in  `arrays` (ArrayRecord: the global shared tensors), `config` (server-round)
          out `arrays` (exactly the shared keys; empty for local-only), `metrics` (num-examples, loss ...)
evaluate: in  the same; out `metrics` (rouge-l, retention-loss, expert-std)
The grafted experts and gates (or local-only adapters) never travel: they live in `context.state` and
in OUT/clients/client-<i>/ on disk, from which a rerun (a new run, empty state) resumes.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexmore.flex.client import Personal, client_dir, evaluate, load_personal, save_personal, train_round
from flexmore.flex.config import FlexConfig

from .wire import to_array_record

app = ClientApp()
STATE_ARRAYS, STATE_META = "flex-personal", "flex-personal-meta"


def client_index(context: Context) -> int:
    """Simulation: the node's partition-id; deployment: `--node-config partition-id=I`."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise ValueError("this node has no partition-id in its node config (deployment: --node-config partition-id=I)")
    return int(value)


def _global(msg: Message) -> dict:
    record = msg.content.array_records.get("arrays")
    return record.to_torch_state_dict() if record is not None and len(record) else {}


def _personal(context: Context, config: FlexConfig, client: int) -> Personal | None:
    if STATE_META in context.state:
        meta = json.loads(str(context.state.config_records[STATE_META]["json"]))
        arrays = context.state.array_records.get(STATE_ARRAYS)
        return Personal(arrays.to_torch_state_dict() if arrays is not None and len(arrays) else {}, meta)
    return load_personal(client_dir(config, client))


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = FlexConfig.from_run_config(context.run_config)
    client = client_index(context)
    server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    result = train_round(config, client, server_round, _global(msg) or None, _personal(context, config, client))
    save_personal(client_dir(config, client), result.personal)
    context.state[STATE_ARRAYS] = to_array_record(result.personal.tensors)
    context.state[STATE_META] = ConfigRecord({"json": json.dumps(result.personal.meta)})
    metrics: dict[str, Any] = {"num-examples": result.num_examples, "client": client, **result.metrics}
    return Message(
        RecordDict({"arrays": to_array_record(result.shared), "metrics": MetricRecord(metrics)}), reply_to=msg
    )


@app.evaluate()
def evaluate_client(msg: Message, context: Context) -> Message:
    config = FlexConfig.from_run_config(context.run_config)
    client = client_index(context)
    metrics: dict[str, Any] = evaluate(config, client, _global(msg) or None, _personal(context, config, client))
    return Message(RecordDict({"metrics": MetricRecord(metrics | {"client": client})}), reply_to=msg)
