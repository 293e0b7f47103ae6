"""The rank sweep: one extraction per expert, in-memory composition equal to compose(), a resumable store
that never evaluates a point twice, and the CLI. Offline, CPU, seconds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import FlexOlmoForCausalLM
from typer.testing import CliRunner

from flexmore.cli import app
from flexmore.evaluation import runner
from flexmore.evaluation.embedded import EmbeddedConfig, text_items, write_task
from flexmore.evaluation.runner import EvalConfig, load_mixture
from flexmore.evaluation.store import Result, ResultStore
from flexmore.evaluation.sweep import SweepExpert, _full_model, _low_rank_model, _Public, power_of_two_ranks, sweep
from flexmore.lowrank.extract import ExtractConfig, extract
from flexmore.mixture.compose import ComposeConfig, ExpertSpec, compose
from flexmore.toy import save_tiny_flexolmo, tiny_config
from flexmore.training.tokenizer import train_tokenizer
from helpers import sentences

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-expert FlexOlmo (public + a full domain expert, with tokenizer), its expert extracted at rank 8,
    and a local multiple-choice task."""
    root = tmp_path_factory.mktemp("sweep")
    rng = random.Random(0)
    docs = [sentences(rng, 6) for _ in range(40)]
    tok = train_tokenizer(docs, 300)
    save_tiny_flexolmo(root / "flexolmo", tiny_config(2, vocab_size=len(tok), pad_token_id=0, eos_token_id=0))
    tok.save_pretrained(root / "flexolmo")
    extract(ExtractConfig(source=str(root / "flexolmo"), out=root / "experts", names=("x",), max_rank=8))
    items = text_items(docs[:12], EmbeddedConfig(items=10, context_chars=60, continuation_chars=16), random.Random(1))
    (root / "tasks").mkdir()
    write_task(root / "tasks", "local_mc", items)
    return root


def config(world: Path, **kw: object) -> EvalConfig:
    return EvalConfig(tasks="local_mc", include=(world / "tasks",), limit=6, batch_size=8, **kw)  # type: ignore[arg-type]


@torch.no_grad()
def test_in_memory_points_equal_composed_and_stock_models(world: Path) -> None:
    public = _Public(world / "flexolmo")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for rank in (1, 8):
        mine = _low_rank_model(public, "x", world / "experts" / "x", rank, active=2)
        out = world / f"composed-{rank}"
        compose(
            ComposeConfig(
                public=str(world / "flexolmo"),
                experts=(ExpertSpec("x", str(world / "experts/x"), rank),),
                out=out,
                top_k=2,
            )
        )
        theirs, _ = load_mixture(out)
        torch.testing.assert_close(mine(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert mine.config.num_experts_per_tok == 2 and mine.config.expert_ranks == [None, rank]
    # The full point is the stock 2-expert FlexOlmo, top-2 of 2.
    full = _full_model(public, SweepExpert.parse("x", world / "flexolmo"), active=2)
    stock = FlexOlmoForCausalLM.from_pretrained(world / "flexolmo").eval()
    torch.testing.assert_close(full(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_sweep_resumes_without_reevaluating(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int | None]] = []
    real = runner.evaluate_mixture
    fail_at: list[int] = [3]

    def counting(model, tok, cfg, *, active, mixture, expert=None, rank=None, plan=None, heldout=None, progress=None):
        if len(calls) + 1 == fail_at[0]:
            raise KeyboardInterrupt  # the run stops mid-sweep
        calls.append((expert, rank))
        return real(
            model, tok, cfg, active=active, mixture=mixture, expert=expert, rank=rank, plan=plan, heldout=heldout
        )

    monkeypatch.setattr(runner, "evaluate_mixture", counting)
    store = tmp_path / "results.jsonl"
    experts = {"x": world / "experts" / "x", "y": world / "flexolmo"}  # low-rank folder; full FlexOlmo checkpoint
    with pytest.raises(KeyboardInterrupt):
        sweep(world / "flexolmo", experts, store, config(world), ranks=[1, 2, 8], work=tmp_path / "work")
    assert calls == [("x", 1), ("x", 2)]
    assert [r.mixture for r in ResultStore(store).records()] == ["x@1", "x@2"]

    fail_at[0] = 0
    report = sweep(world / "flexolmo", experts, store, config(world), ranks=[1, 2, 8], work=tmp_path / "work")
    # Only the points the stopped run had not measured; y was extracted once, at the largest rank.
    assert calls == [("x", 1), ("x", 2), ("x", 8), ("y", 1), ("y", 2), ("y", 8), ("y", None)]
    assert report.skipped == [("x@1", "x", 1, 2), ("x@2", "x", 2, 2)]
    assert report.extracted == [tmp_path / "work" / "experts" / "y"]
    records = ResultStore(store).records()
    assert len(records) == 7 and len({r.key for r in records}) == 7
    params = {r.mixture: r.params or 0 for r in records}
    assert params["x@1"] < params["x@2"] < params["x@8"] < params["y@full"]
    assert all(r.n == 6 and 0 <= r.score <= 1 and r.active == 2 for r in records)
    # The same rank of the same expert, extracted by us or given: the same scores.
    assert {r.rank: r.score for r in records if r.expert == "x"} == {
        r.rank: r.score for r in records if r.expert == "y" and r.rank
    }

    again = sweep(world / "flexolmo", experts, store, config(world), ranks=[1, 2, 8], work=tmp_path / "work")
    assert len(calls) == 7 and again.evaluated == [] and len(again.skipped) == 7
    # A torn last line (a crash mid-append) is dropped and only that point is measured again.
    lines = store.read_text().splitlines(keepends=True)
    store.write_text("".join(lines[:-1]) + lines[-1][:20])
    sweep(world / "flexolmo", experts, store, config(world), ranks=[1, 2, 8], work=tmp_path / "work")
    assert calls[7:] == [("y", None)]
    # A narrower sweep over stored points evaluates nothing.
    subset = sweep(world / "flexolmo", {"x": experts["x"]}, store, config(world), ranks=[1])
    assert subset.evaluated == [] and calls[8:] == []


def test_sweep_errors_and_default_ranks(world: Path, tmp_path: Path) -> None:
    assert power_of_two_ranks(8) == [1, 2, 4, 8] and power_of_two_ranks(12) == [1, 2, 4, 8, 12]
    store = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match="exceeds its stored max rank 8"):
        sweep(world / "flexolmo", {"x": world / "experts" / "x"}, store, config(world), ranks=[16])
    with pytest.raises(ValueError, match=r"min\(hidden, intermediate\)"):
        sweep(world / "flexolmo", {"x": world / "experts" / "x"}, store, config(world), ranks=[1000])
    with pytest.raises(FileNotFoundError, match="neither a low-rank expert folder"):
        sweep(world / "flexolmo", {"x": tmp_path}, store, config(world))
    with pytest.raises(ValueError, match=r"domain experts \[1, 1\]"):
        SweepExpert.parse("x", f"{world / 'flexolmo'}#2")
    other = tmp_path / "other"
    save_tiny_flexolmo(other, tiny_config(2, vocab_size=300, pad_token_id=0, eos_token_id=0), seed=7)
    with pytest.raises(ValueError, match="was not built on public model"):
        sweep(other, {"x": world / "experts" / "x"}, store, config(world), ranks=[1], tokenizer=object())
    assert not store.exists() or ResultStore(store).records() == []


def test_cli_sweep(world: Path, tmp_path: Path) -> None:
    store = tmp_path / "results.jsonl"
    args = ["sweep", "--public", str(world / "flexolmo"), "--expert", f"x={world / 'experts' / 'x'}", "--ranks", "2,4"]
    args += ["--results", str(store), "--tasks", "local_mc", "--include", str(world / "tasks"), "--limit", "4"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 points evaluated, 0 already in" in first.output and "local_mc" in first.output
    assert sorted(r.rank or 0 for r in ResultStore(store).records() if isinstance(r, Result)) == [2, 4]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 points evaluated, 2 already in" in again.output
    bad = CliRunner().invoke(app, [*args[:4], "x", "--results", str(store)])
    assert bad.exit_code == 2 and "NAME=DIR" in bad.output
