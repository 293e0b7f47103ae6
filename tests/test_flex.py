"""FLEx: the method on tiny models of every supported family (no download), the server's math, and a
real Flower simulation (Ray) that resumes from its checkpoint."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from flexmore.flex import tasks
from flexmore.flex.adapters import UnsupportedModelError, expert_weights, family_of, frozen_names, moe_blocks
from flexmore.flex.aggregate import (
    ServerState,
    load_checkpoint,
    save_checkpoint,
    server_update,
    weighted_mean,
)
from flexmore.flex.client import frozen_tensors, train_round
from flexmore.flex.config import FlexConfig
from flexmore.flex.gate import attach_grafts, graft_state
from flexmore.flex.graft import (
    GraftChoice,
    channel_outputs,
    choose_grafts,
    prune_channels,
    select_experts,
)
from flexmore.flex.metrics import rouge_l
from flexmore.flex.shared import build_trainable, shared_state
from flexmore.training.corpus import math_item
from flexmore.training.tokenizer import train_tokenizer

H, V = 32, 300
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2, pad_token_id=0, eos_token_id=0,
              bos_token_id=None)  # fmt: skip
FAMILIES = {
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            **COMMON, intermediate_size=64, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32
        )
    ),
    "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(**COMMON, intermediate_size=16, num_experts=4)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4)),
    "flex_olmo": lambda: FlexOlmoForCausalLM(FlexOlmoConfig(**COMMON, intermediate_size=16, num_experts=4)),
}


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # routers start at zero in some families: random rows make routing real
        for block in moe_blocks(model).values():
            block.gate.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-MoE checkpoint with a tokenizer trained on the task families (random weights)."""
    folder = tmp_path_factory.mktemp("flex") / "base"
    tokenizer = train_tokenizer([i.text for i in tasks.generate(60)], V, min_frequency=1)
    model = tiny("qwen2_moe")
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = random.Random(0)
    docs = [f"{math_item(rng)}\n\n" + " ".join(rng.choice(tasks._WORDS) for _ in range(60)) for _ in range(40)]
    (folder / "general.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))  # retention
    return folder


def flex_config(base: Path, out: Path, **kw: object) -> FlexConfig:
    config = FlexConfig(model=str(base), out=out, clients=2, rounds=2, local_steps=3, batch_size=4, seq_len=32,
                        examples_per_family=24, heldout_per_client=3, calibration_examples=8, max_new_tokens=4,
                        retention_blocks=2, graft_width=8, wait_nodes_s=120.0, round_timeout_s=300.0,
                        families="arithmetic,sorting", retention_data=str(base / "general.jsonl"))  # fmt: skip
    return replace(config, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- families, gate, grafting


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_closed_gate_gives_the_stock_models_logits_exactly(family: str) -> None:
    """A graft behind a closed gate (bias -inf) changes nothing, bit for bit, including the router logits
    the model returns; an open gate does change the output."""
    stock = tiny(family)
    grafted = tiny(family)
    ids = torch.randint(0, V, (2, 12))
    want = stock(input_ids=ids, output_router_logits=True)
    X = torch.randn(40, H)
    calibration = {i: (X, b(X[None])[0]) for i, b in moe_blocks(grafted).items()}
    attach_grafts(grafted, choose_grafts(grafted, calibration, width=8), gate_bias=-math.inf)
    got = grafted(input_ids=ids, output_router_logits=True)
    assert torch.equal(got.logits, want.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.router_logits, want.router_logits, strict=True))
    for branch in moe_blocks(grafted).values():
        torch.nn.init.constant_(branch.flex_graft.gates[0].proj.bias, 0.0)
    assert not torch.allclose(grafted(input_ids=ids).logits, want.logits)


def test_unknown_family_is_refused() -> None:
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=4))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="unsupported model family 'llama'"):
        family_of(llama)


def test_selection_picks_the_expert_that_reproduces_the_output() -> None:
    """A block whose output is constructed as 0.7 x expert 2's: expert 2 is chosen with alpha 0.7 and
    (numerically) zero error; every other expert reconstructs worse."""
    block = moe_blocks(tiny("olmoe"))[0]
    X = torch.randn(200, H)
    h, down = channel_outputs(block, 2, X)
    Z = 0.7 * (h @ down.T)  # (N, H)
    ranked = select_experts(block, X, Z, k=4)
    expert, alpha, error = ranked[0]
    assert expert == 2 and alpha == pytest.approx(0.7, rel=1e-5) and error < 1e-10
    assert all(e > 1e-3 for _, _, e in ranked[1:])
    with pytest.raises(ValueError, match="k must be in"):
        select_experts(block, X, Z, k=5)


def test_pruning_to_full_width_reproduces_the_copied_expert() -> None:
    model = tiny("qwen2_moe")
    block = moe_blocks(model)[1]
    X = torch.randn(64, H)
    h, down = channel_outputs(block, 1, X)
    I = h.shape[1]
    assert prune_channels(h, down, h @ down.T, 1.0, I) == list(range(I))
    choice = GraftChoice(1, 1, 1.0, 0.0, 0.0, tuple(range(I)))
    attach_grafts(model, {0: [replace(choice, layer=0)], 1: [choice]})
    graft = block.flex_graft.experts[0]
    gate, up, d = expert_weights(block, 1)
    assert torch.equal(graft.gate_proj, gate) and torch.equal(graft.up_proj, up) and torch.equal(graft.down_proj, d)
    torch.testing.assert_close(graft(X), h @ down.T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="width must be in"):
        prune_channels(h, down, h @ down.T, 1.0, I + 1)


def test_pruning_drops_the_channels_that_matter_least() -> None:
    """Channels whose down-projection is zero cost nothing to remove: they go first."""
    block = moe_blocks(tiny("mixtral"))[0]
    X = torch.randn(100, H)
    h, down = channel_outputs(block, 0, X)
    dead = [1, 5, 9, 12]
    down[:, dead] = 0
    Z = h @ down.T
    assert set(prune_channels(h, down, Z, 1.0, h.shape[1] - len(dead))).isdisjoint(dead)


def test_graft_width_out_of_range_is_refused(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--graft-width 999 is out of range"):
        train_round(flex_config(base, tmp_path, graft_width=999), 0, 1, None, None)
    with pytest.raises(ValueError, match=r"FlexConfig\.method"):
        flex_config(base, tmp_path, method="fedsgd")
    with pytest.raises(ValueError, match="5 clients but only 4 task families"):
        tasks.partition([i.family for i in tasks.generate(5)], 5, "pathological")


# ---------------------------------------------------------------- a local round


def test_flex_round_keeps_experts_and_routers_bit_identical(base: Path, tmp_path: Path) -> None:
    config = flex_config(base, tmp_path)
    pretrained = frozen_tensors(AutoModelForCausalLM.from_pretrained(base))
    result = train_round(config, 0, 1, None, None)
    assert result.model is not None
    after = frozen_tensors(result.model)
    short = {n.removeprefix("base_model.model."): t for n, t in after.items()}
    assert set(short) == set(pretrained) and len(pretrained) == 2 * (
        1 + 2 + 4
    )  # router, experts, shared expert + its gate
    assert all(torch.equal(short[n], pretrained[n]) for n in pretrained)
    # what travels: exactly the attention LoRA tensors; the grafts (which did train) stay personal
    assert result.shared and all(".self_attn." in k and ".lora_" in k for k in result.shared)
    assert set(result.personal.tensors) == set(graft_state(result.model))
    first = AutoModelForCausalLM.from_pretrained(base)
    attach_grafts(first, {int(k): [GraftChoice(**c | {"channels": tuple(c["channels"])}) for c in v]
                          for k, v in result.personal.meta["grafts"].items()})  # fmt: skip
    assert any(not torch.equal(result.personal.tensors[k], v) for k, v in graft_state(first).items())


def test_baselines_aggregate_expert_lora_and_flex_does_not() -> None:
    flex = shared_state(build_trainable(tiny("qwen2_moe"), "flex"))
    full = shared_state(build_trainable(tiny("qwen2_moe"), "fedavg"))
    assert set(flex) < set(full) and any(".experts." in k for k in full)
    assert not any(".experts." in k or "shared_expert" in k for k in flex)
    assert sum(t.numel() for t in full.values()) > 5 * sum(t.numel() for t in flex.values())
    assert frozen_names(build_trainable(tiny("mixtral"), "flex")) != []


# ---------------------------------------------------------------- server math


def test_aggregate_is_the_hand_computed_weighted_mean(tmp_path: Path) -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    b = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([[1.5]])}
    avg = weighted_mean([(a, 1.0), (b, 3.0)])
    assert torch.equal(avg["w"], torch.tensor([(1 * 1 + 3 * 3) / 4, (2 * 1 - 2 * 3) / 4]))
    assert torch.equal(avg["b"], torch.tensor([[(0.5 + 3 * 1.5) / 4]]))
    with pytest.raises(ValueError, match="other keys"):
        weighted_mean([(a, 1.0), ({"w": b["w"]}, 1.0)])
    # FedAvgM: v = beta v + (w - avg); w' = w - lr v, checked by hand over two rounds
    state = ServerState(0, {"w": torch.tensor([1.0, 1.0])})
    s1 = server_update(state, {"w": torch.tensor([0.0, 2.0])}, momentum=0.5, server_lr=1.0)
    assert torch.equal(s1.tensors["w"], torch.tensor([0.0, 2.0]))
    s2 = server_update(s1, {"w": torch.tensor([0.0, 2.0])}, momentum=0.5, server_lr=1.0)
    assert torch.equal(s2.tensors["w"], torch.tensor([-0.5, 2.5])) and s2.round == 2
    save_checkpoint(tmp_path / "ckpt", s2, {"method": "fedavgm"})
    loaded, meta = load_checkpoint(tmp_path / "ckpt")  # type: ignore[misc]
    assert loaded.round == 2 and torch.equal(loaded.momentum["w"], s2.momentum["w"]) and meta["method"] == "fedavgm"


# ---------------------------------------------------------------- tasks and metrics


def test_tasks_have_checked_answers_and_partitions_cover_everything() -> None:
    items = tasks.generate(30)
    assert all(tasks.check(i) for i in items) and {i.family for i in items} == set(tasks.FAMILIES)
    labels = [i.family for i in items]
    patho = tasks.partition(labels, 4, "pathological")
    assert all(len({labels[j] for j in part}) == 1 for part in patho)
    for scheme in ("iid", "dirichlet:0.5"):
        parts = tasks.partition(labels, 3, scheme)
        assert sorted(j for p in parts for j in p) == list(range(len(items)))
    with pytest.raises(ValueError, match="unknown partition"):
        tasks.partition(labels, 2, "shards")
    assert rouge_l(["3 7 19 42"], ["3 7 19 42"]) == 1.0 and rouge_l(["nothing"], ["3 7"]) == 0.0


def test_client_app_replies_with_exactly_the_shared_keys(base: Path, tmp_path: Path) -> None:
    """The ClientApp's reply: the global shared keys (attention LoRA) and metrics; the grafts it trained
    are in context.state and on disk only. A CLI call with both modes is refused."""
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from flexmore.federated import flex_client_app
    from flexmore.federated.wire import to_array_record
    from flexmore.flex.server import initial_shared

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        config = flex_config(base, tmp_path)
        shared = initial_shared(config)
        content = RecordDict({"arrays": to_array_record(shared), "config": ConfigRecord({"server-round": 1})})
        msg = Message(content, dst_node_id=3, message_type="train")
        context = Context(run_id=1, node_id=3, node_config={"partition-id": 1}, state=RecordDict(),
                          run_config=config.to_run_config())  # fmt: skip
        reply = flex_client_app.app(msg, context)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    assert not reply.has_error(), reply.error
    assert set(reply.content.array_records) == {"arrays"} and not reply.content.config_records
    assert set(reply.content["arrays"].keys()) == set(shared)
    state = context.state[flex_client_app.STATE_ARRAYS]
    assert isinstance(state, ArrayRecord) and state.keys() and not set(state.keys()) & set(shared)
    assert (tmp_path / "clients" / "client-1" / "personal.safetensors").is_file()

    from typer.testing import CliRunner

    from flexmore.cli import app as cli

    result = CliRunner().invoke(cli, ["flex", "--out", str(tmp_path / "x"), "--model", str(base), "--simulation",
                                      "--deployment"])  # fmt: skip
    assert result.exit_code == 2 and "exactly one of --simulation or --deployment" in result.output


# ---------------------------------------------------------------- Flower for real


@pytest.mark.slow
def test_flower_simulation_two_clients_two_rounds_then_resumes(base: Path, tmp_path: Path) -> None:
    """2 clients, 2 rounds on Flower's simulation engine; then a rerun asked for 3 rounds resumes after
    round 2 (one more round), with each client's grafts reloaded from disk."""
    pytest.importorskip("flwr")
    from flexmore.federated.flex_runner import run_flex_simulation

    out = tmp_path / "out"
    first = run_flex_simulation(flex_config(base, out)).report
    assert first["error"] is None and first["rounds_this_run"] == [1, 2]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if "evaluation" not in r]
    assert [r["round"] for r in rounds] == [1, 2] and all(len(r["clients"]) == 2 and not r["failed"] for r in rounds)
    assert set(first["evaluation"]) == {"0", "1"}
    assert all(0 <= m["rouge-l"] <= 1 and math.isfinite(m["retention-loss"]) for m in first["evaluation"].values())
    grafts = {c: json.loads((out / "clients" / f"client-{c}" / "personal.json").read_text()) for c in (0, 1)}
    assert all(g["round"] == 2 and g["grafts"] for g in grafts.values())
    state, _meta = load_checkpoint(out / "checkpoint")  # type: ignore[misc]
    assert state.round == 2 and all(".lora_" in k for k in state.tensors)
    # the bytes of a round: the shared LoRA tensors down to each client and back, nothing else
    shared = 4 * sum(t.numel() for t in state.tensors.values())
    assert rounds[-1]["payload_bytes_sent"] == rounds[-1]["payload_bytes_received"] == 2 * shared

    second = run_flex_simulation(flex_config(base, out, rounds=3)).report
    assert second["error"] is None and second["rounds_this_run"] == [3]
    assert load_checkpoint(out / "checkpoint")[0].round == 3  # type: ignore[index]
    for c in (0, 1):
        personal = json.loads((out / "clients" / f"client-{c}" / "personal.json").read_text())
        assert personal["round"] == 3 and personal["grafts"] == grafts[c]["grafts"]  # grafted once, reloaded
    assert (out / "report.md").is_file() and second["summary"]["rounds"] == 3


@pytest.mark.slow
def test_flower_loopback_deployment_one_round(base: Path, tmp_path: Path) -> None:
    """A SuperLink and two SuperNodes as real processes on 127.0.0.1 run one FLEx round; only the
    shared LoRA travels, and every process the launcher started is stopped."""
    pytest.importorskip("flwr")
    from flexmore.federated.flex_runner import run_flex_deployment
    from flexmore.federated.processes import _alive  # zombies count as stopped

    out = tmp_path / "out"
    result = run_flex_deployment(flex_config(base, out, rounds=1))
    report = result.report
    assert report["error"] is None and report["rounds_this_run"] == [1]
    assert any("flower-supernode" in c for c in result.commands)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "evaluation" not in line]
    assert len(row["clients"]) == 2 and not row["failed"]
    state, _meta = load_checkpoint(out / "checkpoint")  # type: ignore[misc]
    shared = 4 * sum(t.numel() for t in state.tensors.values())
    assert row["payload_bytes_sent"] == row["payload_bytes_received"] == 2 * shared
    assert result.stopped_pids and all(not _alive(pid) for pid in result.stopped_pids)
