"""Federation on Flower: experts trained in isolation on tiny models, sent as records, saved, composed.

Fast tests call the ClientApp and the server's round directly (a fake Grid); the others run Flower
for real: a simulation (Ray) with a failing and a refused node, then a resumed rerun through the CLI,
and a loopback deployment (SuperLink + two SuperNodes as processes on 127.0.0.1, marked slow).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import flexmore.mixture  # noqa: F401 - registers model_type "flexmore" with the Auto classes
from flexmore.cli import app as cli
from flexmore.federated import client_app
from flexmore.federated.config import FederateConfig, NodeSpec, TrainRequest, parse_node_map
from flexmore.federated.coordinator import MESSAGES, Round, connected_nodes
from flexmore.federated.processes import ProcessGroup, _alive, descendants
from flexmore.federated.runner import FederationResult, run_deployment, run_simulation
from flexmore.federated.store import RECEIPT, PublicModel
from flexmore.federated.wire import (
    FULL,
    LOW_RANK,
    WireError,
    expected_shapes,
    from_array_record,
    message_bytes,
    payload_bytes,
    to_array_record,
)
from flexmore.training.corpus import math_item
from flexmore.training.loop import TrainConfig
from flexmore.training.public import PretrainConfig, PublicModelConfig, pretrain
from helpers import WORDS, sentences

TINY = PublicModelConfig(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=64,
)  # fmt: skip
TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup=1, eval_batches=2)
DIMS = (TINY.num_hidden_layers, TINY.hidden_size, TINY.intermediate_size)
REQUEST_KEYS = sorted(TrainRequest("p", "h", None, TRAIN, None, 16, 0.05).to_record())


def write_docs(folder: Path, docs: list[str]) -> str:
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(doc)
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrained public model, a tampered copy of it, and three owners' documents."""
    root = tmp_path_factory.mktemp("federated")
    rng = random.Random(0)
    write_docs(root / "general", [sentences(rng, 6) if i % 3 else math_item(rng) for i in range(120)])
    write_docs(root / "math", ["\n\n".join(math_item(rng) for _ in range(4)) for _ in range(40)])
    write_docs(root / "words", [sentences(rng, 8) for _ in range(40)])
    write_docs(root / "lists", [", ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(40)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(
            PretrainConfig(out=root / "public", data=str(root / "general"), model=TINY, train=replace(TRAIN, steps=20))
        )
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(root / "public", root / "tampered")
    weights = load_file(root / "tampered" / "model.safetensors")
    weights["model.norm.weight"] += 1e-3  # one non-expert tensor differs: another public model
    save_file(weights, root / "tampered" / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a Flower runtime (the fast tests) need the process's task identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def federate_config(world: Path, out: Path, node_data: dict[int, str], **kw: object) -> FederateConfig:
    base = FederateConfig(
        public=str(world / "public"), out=out, node_data=node_data, train=TRAIN, router_docs=16,
        wait_nodes_s=120.0, round_timeout_s=240.0,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def run_mixture(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, TINY.vocab_size, (2, 16))).logits
    assert logits.shape == (2, 16, TINY.vocab_size) and torch.isfinite(logits).all()
    return logits


def experts_in(folder: Path) -> list[str]:
    return json.loads((folder / "config.json").read_text())["expert_names"]


def lines(out: Path, token: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / MESSAGES).read_text().splitlines()]
    return [r for r in rows if r["run_token"] == token]


# ---------------------------------------------------------------- records, configs (no Flower runtime)


@pytest.mark.parametrize(("kind", "rank"), [(FULL, None), (LOW_RANK, 4)])
def test_wire_round_trip_exact_keys_float32(kind: str, rank: int | None) -> None:
    shapes = expected_shapes(kind, *DIMS, rank)
    tensors = {k: torch.randn(s).to(torch.bfloat16) for k, s in shapes.items()}  # bf16 travels as float32
    record = to_array_record(tensors)
    assert all(a.dtype == "float32" for a in record.values())
    back = from_array_record(record, shapes)
    assert all(torch.equal(back[k], tensors[k].float()) for k in shapes)
    message = Message(RecordDict({"expert": record}), dst_node_id=1, message_type=MessageType.TRAIN)
    assert message_bytes(message) > payload_bytes(message) == 4 * sum(t.numel() for t in tensors.values())

    extra = to_array_record(tensors | {"model.embed_tokens.weight": torch.zeros(3, 2)})
    with pytest.raises(WireError, match="unexpected"):
        from_array_record(extra, shapes)
    key = next(iter(shapes))
    wrong = to_array_record(tensors | {key: torch.zeros(1, 1)})
    with pytest.raises(WireError, match=key.replace(".", r"\.")):
        from_array_record(wrong, shapes)


def test_configs_round_trip_and_name_the_bad_field(world: Path) -> None:
    config = federate_config(world, world / "o", {0: "embedded:math", 1: str(world / "words")}, rank=8)
    assert FederateConfig.from_run_config(config.to_run_config()) == replace(config, out=(world / "o").resolve())
    request = config.request("abc", ["math"])
    assert TrainRequest.from_record(request.to_record()) == request
    assert parse_node_map("0=embedded:code, 1=/a=b") == {0: "embedded:code", 1: "/a=b"}
    with pytest.raises(ValueError, match="node-data"):
        parse_node_map("0=a,0=b")
    with pytest.raises(ValueError, match=r"FederateConfig\.rank"):
        replace(config, rank=0)
    with pytest.raises(ValueError, match="node_public"):
        replace(config, node_public={5: "/x"})
    with pytest.raises(ValueError, match="both train expert 'math'"):
        replace(config, node_data={0: "embedded:math", 1: "/data/math"})
    # simulation: the node's data comes from the run config at its partition-id; deployment: its node config
    sim = NodeSpec.from_context({"partition-id": 1, "num-partitions": 2}, config.to_run_config())
    assert (sim.name, sim.data) == ("words", str(world / "words"))
    dep = NodeSpec.from_context({"data": "embedded:code", "name": "py"}, {})
    assert (dep.name, dep.data, dep.public) == ("py", "embedded:code", None)
    with pytest.raises(ValueError, match="--node-config"):
        NodeSpec.from_context({}, {})


def _train_message(request: TrainRequest) -> Message:
    return Message(RecordDict({"config": ConfigRecord(request.to_record())}), dst_node_id=7, message_type="train")


def test_client_refuses_a_different_public_model(world: Path) -> None:
    public = PublicModel(world / "public")
    request = federate_config(world, world / "o", {0: "x"}).request(public.sha256, [])
    context = Context(run_id=1, node_id=7, node_config={"data": "embedded:math", "public": str(world / "tampered")},
                      state=RecordDict(), run_config={})  # fmt: skip
    reply = client_app.app(_train_message(request), context)
    assert reply.has_error() and reply.error.code == client_app.REFUSED
    reason = reply.error.reason or ""
    assert "refuses to train" in reason and str(world / "tampered") in reason and public.sha256[:16] in reason
    # a name the server already holds: a data-free "skipped" reply, no training, no hash
    skip = replace(request, skip=("math",))
    reply = client_app.app(_train_message(skip), context)
    assert not reply.has_error() and dict(reply.content["expert-info"]) == {"name": "math", "status": "skipped"}


def test_process_group_stops_the_tree_it_started(tmp_path: Path) -> None:
    """A started process and the grandchild it spawns in a new session (as Flower's SuperExec does)
    are both stopped by pid, also when the block raises."""
    group = ProcessGroup(tmp_path / "logs", dict(os.environ))
    with pytest.raises(RuntimeError, match="boom"), group:
        script = "import subprocess, time; subprocess.Popen(['sleep', '60'], start_new_session=True); time.sleep(60)"
        started = group.start("tree", [sys.executable, "-c", script])
        deadline = time.monotonic() + 20
        while not descendants(started.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        grandchild = descendants(started.pid)[0]
        raise RuntimeError("boom")
    assert not _alive(started.pid) and not _alive(grandchild)


class FakeGrid:
    """Nodes whose replies are given (None: the node never replies; it disappeared mid-round)."""

    def __init__(self, replies: dict[int, RecordDict | None]) -> None:
        self.replies, self.pushed = replies, []

    def get_node_ids(self) -> list[int]:
        return list(self.replies)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"  # the SuperLink's job
            self.pushed.append(m)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        return [
            Message(reply, reply_to=m)
            for m in self.pushed
            if m.metadata.message_id in ids and (reply := self.replies[m.metadata.dst_node_id]) is not None
        ]


def test_connected_nodes_waits_for_the_wanted_count_then_gives_what_is_there() -> None:
    arrivals = {0.0: [], 1.0: [7], 2.0: [7, 3]}  # node ids connected from each second on
    now = [0.0]

    class Arriving:
        def get_node_ids(self) -> list[int]:
            return arrivals[max(t for t in arrivals if t <= now[0])]

    def run(wanted: int, wait_s: float) -> tuple[list[int], float]:
        now[0] = 0.0
        got = connected_nodes(Arriving(), wanted, wait_s, lambda: now[0], lambda s: now.__setitem__(0, now[0] + s))
        return got, now[0]

    assert run(2, 60.0) == ([3, 7], 2.0)  # as soon as both are there, sorted
    assert run(3, 5.0) == ([3, 7], 5.0)  # not all by the deadline: those there
    assert run(1, 0.0) == ([], 0.0)  # no wait: nobody yet


def expert_reply(name: str, extra: dict | None = None) -> RecordDict:
    shapes = expected_shapes(FULL, *DIMS, None)
    return RecordDict(
        {
            "expert": to_array_record({k: 0.02 * torch.randn(s) for k, s in shapes.items()}),
            "metrics": MetricRecord({"num-examples": 4, "loss-before": 3.0, "loss-after": 2.5}),
            "expert-info": ConfigRecord({"name": name, "kind": FULL, "rank": 0}),
            **(extra or {}),
        }
    )


def test_round_keeps_the_good_expert_and_leaves_out_the_rest(world: Path, tmp_path: Path) -> None:
    """Node 11 replies with an expert; node 22 never replies; node 33's reply carries one record more
    than an expert (a ConfigRecord `data`): refused, not stored."""
    smuggled = expert_reply("words", {"data": ConfigRecord({"text": "a private document"})})
    grid = FakeGrid({11: expert_reply("math"), 22: None, 33: smuggled})
    now = [0.0]
    config = federate_config(world, tmp_path / "out", {}, min_nodes=3, round_timeout_s=30.0, run_token="t")
    report = Round(config, grid, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)).run()
    status = {n["node_id"]: (n["status"], n["reason"]) for n in report["nodes"]}
    assert status[11] == ("received", None)
    assert status[22][0] == "failed" and "no reply within 30s" in status[22][1]
    assert status[33][0] == "failed" and "exactly the records" in status[33][1]
    assert not (tmp_path / "out" / "experts" / "words").exists()
    assert experts_in(Path(report["mixture"])) == ["public", "math"]
    run_mixture(Path(report["mixture"]))
    sent = [r for r in lines(tmp_path / "out", "t") if r["direction"] == "sent"]
    assert len(sent) == 3 and all(r["configs"] == {"config": REQUEST_KEYS} and not r["arrays"] for r in sent)


# ---------------------------------------------------------------- Flower for real


@dataclass
class Simulated:
    out: Path
    first: FederationResult  # run 1
    second: dict  # run 2's federation.json
    cli_output: str
    math_receipt_after_first: str


@pytest.fixture(scope="module")
def simulated(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Simulated:
    """Two Flower simulations (Ray) into one --out. Run 1 (library, 3 nodes): `math` trains, the node
    whose data source does not exist raises, and the node holding a tampered public model refuses.
    Run 2 (the CLI, 3 nodes): `math` is already received, `words` and `lists` train in one round."""
    out = tmp_path_factory.mktemp("sim") / "out"
    nodes = {0: str(world / "math"), 1: "embedded:nonexistent", 2: str(world / "words")}
    first = run_simulation(federate_config(world, out, nodes, node_public={2: str(world / "tampered")}), 3)
    receipt = (out / "experts" / "math" / RECEIPT).read_text()
    args = ["federate", "--public", str(world / "public"), "--out", str(out), "--simulation", "3"]
    args += ["--node-data", f"0={world / 'math'},1={world / 'words'},2={world / 'lists'}"]
    args += ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--router-docs", "16"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    second = json.loads((out / "federation.json").read_text())
    return Simulated(out, first, second, result.output, receipt)


def test_simulation_two_clients_compose_a_mixture_that_runs(simulated: Simulated) -> None:
    trained = [n for n in simulated.second["nodes"] if n["status"] == "received"]
    assert sorted(n["name"] for n in trained) == ["lists", "words"]  # two clients, one round
    for node in trained:
        assert node["metrics"]["num-examples"] == TRAIN.steps * TRAIN.batch_size
        assert node["metrics"]["loss-after"] < node["metrics"]["loss-before"]
    mixture = simulated.out / "mixture"
    assert experts_in(mixture) == ["public", "lists", "math", "words"]
    assert json.loads((mixture / "config.json").read_text())["expert_ranks"] == [None] * 4
    run_mixture(mixture)
    assert "mixture ->" in simulated.cli_output and not any(_alive(p) for p in simulated.first.stopped_pids)


def test_simulation_client_that_raises_is_left_out(simulated: Simulated) -> None:
    report = simulated.first.report
    status = {n["name"] or n["node_id"]: (n["status"], n["reason"]) for n in report["nodes"]}
    assert status["math"] == ("received", None)
    raised = [r for s, r in status.values() if s == "failed" and "nonexistent" in str(r)]
    assert len(raised) == 1 and "unknown embedded domain 'nonexistent'" in raised[0]
    assert set(report["experts"]) == {"math"}  # the others are kept, the failures left out
    assert report["mixture"] and len(report["failed"]) == 2


def test_simulation_refuses_a_different_public_model(simulated: Simulated) -> None:
    refused = [n for n in simulated.first.report["nodes"] if "refuses to train" in str(n["reason"])]
    assert len(refused) == 1 and refused[0]["status"] == "failed"
    assert f"code {client_app.REFUSED}" in refused[0]["reason"] and "content hash" in refused[0]["reason"]
    assert "node 'words'" in refused[0]["reason"] and "words" not in simulated.first.report["experts"]


def test_simulation_rerun_skips_experts_already_received(simulated: Simulated) -> None:
    second = simulated.second
    assert {n["name"]: n["status"] for n in second["nodes"]} == {"math": "skipped", "words": "received",
                                                                  "lists": "received"}  # fmt: skip
    assert (simulated.out / "experts" / "math" / RECEIPT).read_text() == simulated.math_receipt_after_first
    assert {k: v["this_run"] for k, v in second["experts"].items()} == {"math": False, "words": True, "lists": True}
    rows = [r for r in lines(simulated.out, second["run_token"]) if r["direction"] == "received"]
    skipped = [r for r in rows if r["name"] == "math"]
    assert len(skipped) == 1 and skipped[0]["arrays"] == {} and skipped[0]["payload_bytes"] == 0


@pytest.mark.slow
def test_deployment_on_loopback_sends_only_expert_arrays(world: Path, tmp_path: Path) -> None:
    """A SuperLink and two SuperNodes as processes on 127.0.0.1: each node trains a rank-4 expert; every
    message carries the request config or exactly the expected expert arrays; every process is stopped."""
    out = tmp_path / "dep"
    config = federate_config(world, out, {0: str(world / "math"), 1: str(world / "words")}, rank=4)
    result = run_deployment(config)
    report = result.report
    assert sorted(n["status"] for n in report["nodes"]) == ["received", "received"], report["failed"]
    assert any("flower-supernode" in c and 'data="' in c for c in result.commands)
    mixture = Path(report["mixture"])
    assert experts_in(mixture) == ["public", "math", "words"]
    assert json.loads((mixture / "config.json").read_text())["expert_ranks"] == [None, 4, 4]
    run_mixture(mixture)

    rows = lines(out, report["run_token"])
    shapes = {k: ["float32", list(s)] for k, s in expected_shapes(LOW_RANK, *DIMS, 4).items()}
    sent = [r for r in rows if r["direction"] == "sent"]
    received = [r for r in rows if r["direction"] == "received"]
    assert len(sent) == len(received) == 2
    for r in sent:  # the request: the public model's identity and the recipe, no arrays
        assert r["arrays"] == {} and r["configs"] == {"config": REQUEST_KEYS} and r["metrics"] == {}
    for r in received:  # the reply: the expert's factors and router rows, and nothing else
        assert r["arrays"] == {"expert": shapes}
        assert r["configs"] == {"expert-info": ["kind", "name", "rank"]}
        assert set(r["metrics"]["metrics"]) >= {"num-examples", "loss-before", "loss-after"}
        assert r["payload_bytes"] == 4 * sum(math.prod(s[1]) for s in shapes.values()) < r["bytes"]
    assert report["bytes"]["received"] == sum(r["bytes"] for r in received)
    assert not any(_alive(pid) for pid in result.stopped_pids)


def test_cli_needs_exactly_one_mode(world: Path) -> None:
    result = CliRunner().invoke(cli, ["federate", "--public", str(world / "public"), "--out", "x", "--deployment",
                                      "--simulation", "2"])  # fmt: skip
    assert result.exit_code == 2 and "exactly one of --simulation N or --deployment" in result.output


def test_simulation_federation_config_takes_whole_cpus_only() -> None:
    from flexmore.federated.runner import simulation_federation

    assert simulation_federation(4, None) == "num-supernodes=4"
    assert simulation_federation(4, 1) == "num-supernodes=4 client-resources-num-cpus=1"
    for bad in (0, 0.5, 1.0):  # Flower 1.42 refuses "1.0" deep inside `flwr run`: say so up front
        with pytest.raises(ValueError, match="positive whole number"):
            simulation_federation(4, bad)  # type: ignore[arg-type]
