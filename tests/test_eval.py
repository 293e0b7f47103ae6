"""Evaluation: embedded task files from held-out documents, lm-eval on a tiny FlexMoRE (checked against our
own log-likelihood scoring), held-out loss, task resolution and errors. Offline, CPU, seconds."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flexmore.cli import app
from flexmore.evaluation.embedded import (
    EmbeddedConfig,
    heldout_documents,
    math_items,
    task_folder,
    text_items,
    write_task,
)
from flexmore.evaluation.groups import PAPER_GROUPS, resolve_tasks
from flexmore.evaluation.heldout import heldout_scores
from flexmore.evaluation.runner import EvalConfig, evaluate_mixture, load_mixture, summarize
from flexmore.evaluation.store import ResultStore
from flexmore.lowrank.extract import ExtractConfig, extract
from flexmore.mixture.compose import ComposeConfig, ExpertSpec, compose
from flexmore.toy import save_tiny_flexolmo, tiny_config
from flexmore.training.corpus import CorpusConfig, build_domain, math_item
from flexmore.training.data import load_texts, pack, split_heldout
from flexmore.training.expert import ExpertTrainConfig
from flexmore.training.loop import heldout_loss
from flexmore.training.tokenizer import train_tokenizer
from helpers import sentences

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_CORPUS = CorpusConfig(max_docs_per_domain=300, max_chars_per_domain=150_000)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FlexMoRE (public + a rank-4 expert) with a locally trained tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    texts = [sentences(rng, 5) for _ in range(60)] + ["\n\n".join(math_item(rng) for _ in range(4)) for _ in range(60)]
    tok = train_tokenizer(texts, 320)
    config = tiny_config(2, vocab_size=len(tok), pad_token_id=0, eos_token_id=0)
    save_tiny_flexolmo(root / "flexolmo", config)
    tok.save_pretrained(root / "flexolmo")
    extract(ExtractConfig(source=str(root / "flexolmo"), out=root / "experts", names=("x",), max_rank=8))
    spec = ExpertSpec("x", str(root / "experts" / "x"), rank=4)
    compose(ComposeConfig(public=str(root / "flexolmo"), experts=(spec,), out=root / "mix"))
    return root


def local_task(folder: Path, seed: int = 1) -> tuple[str, list[dict]]:
    rng = random.Random(seed)
    docs = [sentences(rng, 6) for _ in range(12)]
    items = text_items(docs, EmbeddedConfig(items=12, context_chars=60, continuation_chars=16), random.Random(seed))
    work = [("\n\n".join(math_item(rng) for _ in range(5))) for _ in range(10)]
    items += math_items(work, EmbeddedConfig(items=8, context_chars=60), random.Random(seed))
    folder.mkdir(parents=True, exist_ok=True)
    write_task(folder, "local_mc", items)
    return "local_mc", items


@torch.no_grad()
def our_accuracy(model: torch.nn.Module, tok, items: list[dict]) -> float:
    """Independent scoring: sum of log p(choice tokens | context), argmax (first on ties), as acc."""
    correct = 0
    for item in items:
        n_ctx = len(tok(item["context"], add_special_tokens=False)["input_ids"])
        lls = []
        for choice in item["choices"]:
            ids = tok(item["context"] + choice, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
            lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids))))
        correct += int(max(range(len(lls)), key=lambda i: (lls[i], -i)) == item["label"])
    return correct / len(items)


def test_lm_eval_on_a_local_task_scores_a_tiny_flexmore(mixture: Path, tmp_path: Path) -> None:
    task, items = local_task(tmp_path / "tasks")
    model, tok = load_mixture(mixture / "mix")
    assert type(model).__name__ == "FlexMoReForCausalLM" and model.config.expert_ranks == [None, 4]
    config = EvalConfig(tasks=task, include=(tmp_path / "tasks",), limit=None, batch_size=8, cache=tmp_path / "c")
    results = evaluate_mixture(model, tok, config, active=2, mixture="mix")
    assert [(r.task, r.group, r.metric, r.n, r.active) for r in results] == [(task, task, "acc", len(items), 2)]
    expected = our_accuracy(model, tok, items)
    assert 0.0 <= results[0].score <= 1.0
    assert results[0].score == pytest.approx(expected, abs=1e-12)
    assert results[0].params == sum(p.numel() for p in model.parameters())
    assert summarize(results).avg == pytest.approx(expected)
    # --limit evaluates the first N items.
    limited = evaluate_mixture(
        model, tok, EvalConfig(tasks=task, include=(tmp_path / "tasks",), limit=5), active=1, mixture="m"
    )
    assert limited[0].n == 5 and limited[0].score == pytest.approx(our_accuracy(model, tok, items[:5]), abs=1e-12)


def test_items_are_well_formed_and_math_answers_checked() -> None:
    rng = random.Random(0)
    work = ["\n\n".join(math_item(rng) for _ in range(6)) for _ in range(20)]
    items = math_items(work, EmbeddedConfig(items=30), random.Random(0))
    assert len(items) == 30
    for item in items:
        assert item["context"].endswith("A:") and len(set(item["choices"])) == 4
        truth = item["choices"][item["label"]].strip()
        question = item["context"].rsplit("Q: ", 1)[1].split(" = ?")[0]
        if "divided by" in question:
            a, b = map(int, question.split(" divided by "))
            assert truth == f"{a // b} remainder {a % b}"
        else:
            assert int(truth) == eval(question)
    with pytest.raises(ValueError, match="wrong answer"):
        math_items(["Q: 2 + 2 = ?\nA: 5\n"], EmbeddedConfig(), random.Random(0))
    docs = [sentences(rng, 8) for _ in range(5)]
    texts = text_items(docs, EmbeddedConfig(items=10, continuation_chars=20), random.Random(0))
    for item in texts:
        assert len(set(item["choices"])) == 4 and all(len(c) == 20 and c[0].isspace() for c in item["choices"])
        source = next(d for d in docs if item["context"] + item["choices"][item["label"]] in d)
        assert source


def test_embedded_tasks_use_exactly_train_experts_heldout_documents(tmp_path: Path) -> None:
    config = EmbeddedConfig(corpus=SMALL_CORPUS, items=10, seed=3)
    held = heldout_documents("facts", config)
    # What train-expert --data embedded:facts trains on (its split, its seed) and what the public model sees.
    owner = load_texts("embedded:facts", corpus=SMALL_CORPUS)
    train, theirs = split_heldout(owner, ExpertTrainConfig.heldout_fraction, seed=3)
    assert held == theirs and not set(held) & set(train)
    assert not set(held) & set(build_domain("facts", SMALL_CORPUS, share="public"))
    folder = task_folder(tmp_path, config)
    assert task_folder(tmp_path, config) == folder  # generated once, then reused
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"flexmore_code", "flexmore_docs", "flexmore_math", "flexmore_facts"}
    for task in manifest["tasks"]:
        rows = [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]
        assert len(rows) == 10 and all(0 <= r["label"] < 4 for r in rows)
    facts = [json.loads(line) for line in (folder / "flexmore_facts.jsonl").read_text().splitlines()]
    assert all(any(r["context"] + r["choices"][r["label"]] in d for d in held) for r in facts)


def test_heldout_scores_match_the_training_loss(mixture: Path) -> None:
    model, tok = load_mixture(mixture / "mix")
    rng = random.Random(5)
    docs = [sentences(rng, 10) for _ in range(10)]
    seen: list[tuple[int, int, str]] = []
    [h] = heldout_scores(
        model, tok, {"toy": docs}, seq_len=32, batch_size=2, max_blocks=6, progress=lambda *a: seen.append(a)
    )
    blocks = pack(docs, tok, 32)[:6]
    assert h.loss == pytest.approx(heldout_loss(model, blocks, batch_size=2), rel=1e-6)
    assert h.ppl == pytest.approx(torch.tensor(h.loss).exp().item(), rel=1e-6)
    assert 0.0 <= h.token_acc <= 1.0 and h.tokens == 6 * 31
    assert seen[-1] == (6, 6, "held-out toy")
    with pytest.raises(ValueError, match="no documents"):
        heldout_scores(model, tok, {"empty": []})
    with pytest.raises(ValueError, match="fewer than one block"):
        heldout_scores(model, tok, {"tiny": ["a b"]}, seq_len=32)


def test_task_resolution_and_errors(mixture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = resolve_tasks("embedded,MC9,mmlu_pro")
    assert [g.name for g in plan.groups] == ["code", "docs", "math", "facts", "MC9", "MMLU-Pro"]
    assert len(PAPER_GROUPS["MC9"].tasks) == 9 and len(PAPER_GROUPS["GEN5"].tasks) == 5
    assert [g.name for g in resolve_tasks("paper").groups] == ["MC9", "GEN5", "AGIEval", "BBH", "MMLU", "MMLU-Pro"]
    with pytest.raises(ValueError, match="unknown embedded domain"):
        resolve_tasks("embedded:poetry")
    with pytest.raises(ValueError, match="at least one"):
        resolve_tasks(" , ")
    model, tok = load_mixture(mixture / "mix")
    local_task(tmp_path / "tasks")
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        config = EvalConfig(tasks="no_such_task_xyz", include=(tmp_path / "tasks",))
        monkeypatch.setattr("flexmore.evaluation.harness.task_manager.__defaults__", ((), False))
        evaluate_mixture(model, tok, config, active=2, mixture="m")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"flexmore\[eval\]"):
        evaluate_mixture(model, tok, EvalConfig(tasks="local_mc", include=(tmp_path / "tasks",)), active=2, mixture="m")
    with pytest.raises(ValueError, match=r"active experts must be in \[1, 2\]"):
        evaluate_mixture(model, tok, EvalConfig(tasks="local_mc"), active=3, mixture="m")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="FlexMoRE"):
        load_mixture(tmp_path / "bert")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_mixture(tmp_path)


def test_cli_eval_prints_and_appends_once(mixture: Path, tmp_path: Path) -> None:
    local_task(tmp_path / "tasks")
    store = tmp_path / "results.jsonl"
    args = ["eval", "--model", str(mixture / "mix"), "--tasks", "local_mc", "--include", str(tmp_path / "tasks")]
    args += ["--limit", "6", "--results", str(store), "--name", "mix", "--active", "2"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "local_mc" in first.output and "Avg" in first.output
    records = ResultStore(store).records()
    assert [(r.mixture, r.task, r.n) for r in records] == [("mix", "local_mc", 6)]
    again = CliRunner().invoke(app, args)  # already stored: printed from the store, nothing appended
    assert again.exit_code == 0 and "0 new records" in again.output
    assert len(store.read_text().splitlines()) == 1
    bad = CliRunner().invoke(app, ["eval", "--model", str(tmp_path), "--tasks", "local_mc"])
    assert bad.exit_code == 2 and "config.json" in bad.output
