"""Rank selection strategies on fixed tables: the paper's proxy, the exact budget knapsack, the
data-free spectrum one; and `flexmore select`."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flexmore.analysis.params import dims_config
from flexmore.analysis.scores import point_scores
from flexmore.cli import app
from flexmore.evaluation.store import Result, ResultStore
from flexmore.lowrank.expert import ExpertMeta
from flexmore.selection import (
    SelectionError,
    Strategy,
    cost_from_config,
    parse_count,
    select_budget,
    select_energy,
    select_proxy,
    select_ranks,
)

RANKS = [2**k for k in range(12)]
# Paper section 4.2 / Table 4: best MC9 rank per expert -> heterogeneous (MC9)
MC9_PEAKS = {"code": 64, "creative": 128, "math": 2048, "news": 1, "pes2o": 8, "reddit": 128}
H, I, L = 2048, 3072, 1  # rank 2^11 must fit in min(hidden, intermediate)
PER_RANK = 3 * L * (H + I)  # 3 matrices x layers x (hidden + intermediate)
FULL = 3 * L * H * I


def sweep() -> list[Result]:
    """MC9 peaks at the paper's ranks; GEN5 rises with rank for every expert (so Avg prefers more)."""
    recs = []
    for expert, best in MC9_PEAKS.items():
        for r in RANKS:
            mc9 = 0.68 - 0.001 * abs(math.log2(r) - math.log2(best))
            recs.append(Result(f"{expert}@{r}", expert, r, 2, "arc", "MC9", "acc", mc9))
            recs.append(Result(f"{expert}@{r}", expert, r, 2, "coqa", "GEN5", "f1", 0.4 + 0.01 * math.log2(r)))
        recs.append(Result(f"{expert}@full", expert, None, 2, "arc", "MC9", "acc", 0.9))
        recs.append(Result(f"{expert}@full", expert, None, 2, "coqa", "GEN5", "f1", 0.9))
    return recs


def test_proxy_mc9_gives_the_papers_ranks() -> None:
    sel = select_ranks("proxy:MC9", point_scores(sweep()))
    assert sel.ranks() == MC9_PEAKS  # full-size points do not compete by default
    assert all(c.params is None for c in sel.choices)  # no cost source given
    with_full = select_ranks("proxy:MC9", point_scores(sweep()), include_full=True)
    assert set(with_full.ranks().values()) == {None}


def test_proxy_ties_to_the_lowest_rank_and_avg() -> None:
    assert select_proxy({"a": {8: 0.5, 2: 0.5, 1: 0.4, None: 0.5}}, include_full=True) == {"a": 2}
    # Avg = (MC9 + GEN5) / 2: GEN5 gains 0.005 per log2 step in Avg, MC9 loses 0.0005 beyond the peak
    sel = select_ranks("proxy:avg", point_scores(sweep()))
    assert set(sel.ranks().values()) == {2048}


def brute_force(scores, costs, budget):
    experts = list(scores)
    best = None
    for combo in itertools.product(*(list(scores[e]) for e in experts)):
        cost = sum(costs[e][r] for e, r in zip(experts, combo, strict=True))
        if cost <= budget:
            total = sum(scores[e][r] for e, r in zip(experts, combo, strict=True))
            best = total if best is None else max(best, total)
    return best


def test_budget_by_hand() -> None:
    scores = {"a": {1: 0.5, 4: 0.75, 16: 0.875}, "b": {1: 0.25, 4: 0.375, 16: 0.75}}
    costs = {e: {r: 10 * r for r in by} for e, by in scores.items()}
    assert select_budget(scores, costs, 200) == {"a": 4, "b": 16}  # 40 + 160 = 200: 1.5
    assert select_budget(scores, costs, 199) == {"a": 1, "b": 16}  # 170: 1.25 (a16 + b4 costs 200)
    assert select_budget(scores, costs, 160) == {"a": 4, "b": 4}  # 80: 1.125
    assert select_budget(scores, costs, 20) == {"a": 1, "b": 1}
    with pytest.raises(SelectionError, match=r"too small: the cheapest .* costs 20"):
        select_budget(scores, costs, 19)
    # equal scores: the cheaper choice
    assert select_budget({"a": {1: 0.5, 2: 0.5}}, {"a": {1: 10, 2: 20}}, 100) == {"a": 1}


def test_budget_is_exact_and_never_exceeds() -> None:
    rng = random.Random(0)
    for _ in range(60):
        experts = [f"e{i}" for i in range(rng.randint(1, 4))]
        scores = {e: {r: round(rng.random(), 3) for r in rng.sample(RANKS, rng.randint(1, 5))} for e in experts}
        costs = {e: {r: r * 1_449_984 for r in by} for e, by in scores.items()}
        budget = rng.randint(1, 6000) * 1_449_984 // 3
        expected = brute_force(scores, costs, budget)
        if expected is None:
            with pytest.raises(SelectionError, match="too small"):
                select_budget(scores, costs, budget)
            continue
        chosen = select_budget(scores, costs, budget)
        assert sum(costs[e][r] for e, r in chosen.items()) <= budget
        assert sum(scores[e][r] for e, r in chosen.items()) == pytest.approx(expected)


def test_budget_strategy_uses_the_parameter_accounting() -> None:
    cost = cost_from_config(dims_config(H, I, L))
    assert cost([1, 8, None]) == [PER_RANK, 8 * PER_RANK, FULL]
    points = point_scores(sweep())
    budget = (64 + 128 + 1 + 8 + 128 + 1024) * PER_RANK
    sel = select_ranks(f"budget:{budget}:MC9", points, cost=cost, include_full=False)
    assert sel.total_params is not None and sel.total_params <= budget
    assert sel.budget == budget
    # every MC9 peak fits except math's 2048: math takes its best affordable rank, the rest their peaks
    assert sel.ranks() == {**MC9_PEAKS, "math": 1024}
    assert sel.total_params == budget
    with pytest.raises(SelectionError, match="too small"):
        select_ranks("budget:100", points, cost=cost)
    with pytest.raises(SelectionError, match="parameter costs"):
        select_ranks("budget:1B", points)


def test_budget_includes_full_when_affordable() -> None:
    cost = cost_from_config(dims_config(H, I, L))
    sel = select_ranks("budget:1B", point_scores(sweep()), cost=cost)
    assert set(sel.ranks().values()) == {None}  # full scores 0.9: affordable, so chosen


def write_expert(folder: Path, name: str, energies: dict[str, dict[str, float]], frob: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    meta = ExpertMeta(
        name=name,
        source="test",
        public_expert=0,
        expert_index=1,
        num_layers=L,
        hidden_size=H,
        intermediate_size=I,
        max_rank=16,
        dtype="float32",
        svd="exact",
        shapes={},
        matrices={m: {"frobenius": frob[m], "energy": e} for m, e in energies.items()},
    )
    meta.save(folder)
    return folder


def test_energy_worst_matrix_and_pooled(tmp_path: Path) -> None:
    energies = {
        "layers.0.gate_proj": {"1": 0.5, "2": 0.7, "4": 0.92, "8": 0.97, "16": 1.0},
        "layers.0.down_proj": {"1": 0.2, "2": 0.4, "4": 0.6, "8": 0.91, "16": 1.0},
    }
    folder = write_expert(tmp_path / "x", "x", energies, {"layers.0.gate_proj": 3.0, "layers.0.down_proj": 1.0})
    # worst matrix: down_proj reaches 0.9 at 8; pooled (weights 9 and 1): r=4 keeps (9*.92 + .6)/10 = 0.888,
    # r=8 keeps 0.964; at 0.85, pooled r=4 suffices
    assert select_ranks("energy:0.9", folders={"x": str(folder)}).ranks() == {"x": 8}
    assert select_ranks("energy:0.9:pooled", folders={"x": str(folder)}).ranks() == {"x": 8}
    pooled = select_ranks("energy:0.85:pooled", folders={"x": str(folder)})
    assert pooled.ranks() == {"x": 4} and pooled.choices[0].score == pytest.approx(0.888)
    assert select_energy({"y": {1: 0.95, 2: 0.99}}, 0.9) == {"y": 1}
    with pytest.raises(SelectionError, match=r"no recorded rank keeps 0\.999"):
        select_energy({"y": {1: 0.95, 16: 0.99}}, 0.999)
    with pytest.raises(SelectionError, match="expert folders"):
        select_ranks("energy:0.9")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("greedy", "unknown strategy"),
        ("proxy:", "unknown strategy"),
        ("energy:1.5", "fraction must be in"),
        ("energy:0.9:mean", "only energy mode"),
        ("budget:lots", "parameter count"),
        ("budget:-5", "non-negative"),
    ],
)
def test_bad_strategies(text: str, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        Strategy.parse(text)


def test_parse_count() -> None:
    assert parse_count("750M") == 750_000_000
    assert parse_count("2.5B") == 2_500_000_000
    assert parse_count("1e9") == 10**9
    assert parse_count("1_000") == 1000


def test_selection_errors() -> None:
    with pytest.raises(SelectionError, match="empty"):
        select_ranks("proxy:MC9", [])
    with pytest.raises(SelectionError, match="not measured"):
        select_ranks("proxy:BBH", point_scores(sweep()))
    only_full = [Result("a@full", "a", None, 2, "arc", "MC9", "acc", 0.5)]
    with pytest.raises(SelectionError, match="no measured rank"):
        select_ranks("proxy:MC9", point_scores(only_full))
    two_actives = [*sweep(), Result("code@4", "code", 4, 4, "arc", "MC9", "acc", 0.5)]
    with pytest.raises(SelectionError, match="several active counts"):
        select_ranks("proxy:MC9", point_scores(two_actives))
    assert select_ranks("proxy:MC9", point_scores(two_actives), active=4).ranks() == {"code": 4}


def test_select_cli(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results.jsonl")
    store.append(sweep())
    flat = {"layers.0.gate_proj": {"1": 1.0, "16": 1.0}}
    folders = [write_expert(tmp_path / e, e, flat, {"layers.0.gate_proj": 1.0}) for e in ("code", "news")]
    args = ["select", "--results", str(store.path), "--strategy", "proxy:MC9", "--out", str(tmp_path / "ranks.json")]
    args += [a for f in folders for a in ("--expert", f"{f.name}={f}")]
    result = CliRunner().invoke(app, [*args, "--public", "pub"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "ranks.json").read_text())
    assert [(e["expert"], e["rank"], e["params"]) for e in written["experts"]] == [
        ("code", 64, 64 * PER_RANK),
        ("news", 1, PER_RANK),
    ]
    assert written["total_params"] == 65 * PER_RANK
    assert written["compose_args"] == ["--expert", f"code={folders[0]}@64", "--expert", f"news={folders[1]}@1"]
    assert "flexmore compose --public pub --expert" in result.stdout.replace("\n", "")

    bad = CliRunner().invoke(app, ["select", "--results", str(store.path), "--strategy", "best", "--out", "x.json"])
    assert bad.exit_code == 2 and "unknown strategy" in bad.output
    missing = CliRunner().invoke(app, ["select", "--strategy", "proxy:MC9", "--out", "x.json"])
    assert missing.exit_code == 2 and "give --results" in missing.output
    small = CliRunner().invoke(app, [*args[:4], "budget:10", *args[5:]])
    assert small.exit_code == 2 and "too small" in small.output
