"""Training: the loop (schedule, masks, exact resume), the public model, and experts trained in isolation."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FlexOlmoForCausalLM
from typer.testing import CliRunner

import flexmore.mixture  # noqa: F401 - registers model_type "flexmore" with the Auto classes
from flexmore.cli import app
from flexmore.lowrank.extract import ExtractConfig, extract
from flexmore.mixture.compose import ComposeConfig, CompositionError, ExpertSpec, compose
from flexmore.training.corpus import math_item
from flexmore.training.data import BatchIterator, pack
from flexmore.training.expert import (
    ExpertTrainConfig,
    freeze_all_but_new_expert,
    load_public,
    refactorize,
    train_expert,
    upcycle_full,
)
from flexmore.training.loop import TrainConfig, Trainer, checkpoint_dir_for, lr_factor
from flexmore.training.public import PretrainConfig, PublicModelConfig, pretrain
from helpers import sentences

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PublicModelConfig(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=64,
)  # fmt: skip
TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup=1, eval_batches=2, weight_decay=0.1)


def write_docs(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(doc)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny public model pretrained on a tiny general mix, and a `math` owner's documents."""
    root = tmp_path_factory.mktemp("training")
    rng = random.Random(0)
    general = [sentences(rng, 6) if i % 3 else math_item(rng) for i in range(150)]
    write_docs(root / "general", general)
    write_docs(root / "math", ["\n\n".join(math_item(rng) for _ in range(4)) for _ in range(120)])
    config = PretrainConfig(
        out=root / "public", data=str(root / "general"), model=TINY, train=replace(TRAIN, steps=60, lr=3e-2)
    )
    pretrain(config)
    return root


def expert_config(world: Path, out: Path, **kw: object) -> ExpertTrainConfig:
    base = ExpertTrainConfig(public=str(world / "public"), data=str(world / "math"), out=out, name="math", train=TRAIN)
    return replace(base, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the loop


def test_lr_schedule() -> None:
    c = TrainConfig(steps=11, warmup=2, lr=1.0, min_lr_ratio=0.1)
    assert [lr_factor(s, c) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, c) == pytest.approx(1.0) and lr_factor(10, c) == pytest.approx(0.1)
    assert all(lr_factor(s, c) >= lr_factor(s + 1, c) for s in range(2, 10))


def test_loss_decreases_on_a_repeated_corpus(world: Path) -> None:
    meta = json.loads((world / "public" / "flexmore_train.json").read_text())
    result = meta["result"]
    # 60 steps on a tiny repeated corpus: well below the unigram cross-entropy.
    assert result["heldout_loss"] < result["unigram_loss"] - 0.5, result
    model = FlexOlmoForCausalLM.from_pretrained(world / "public")
    assert model.config.num_experts == 1 and model.config.num_experts_per_tok == 1
    assert (world / "public" / "tokenizer.json").is_file()
    assert not checkpoint_dir_for(world / "public").exists()


def _fresh(world: Path, config: TrainConfig) -> tuple[Trainer, torch.nn.Module]:
    """A masked 2-expert model and its trainer, built from scratch (as a new process would)."""
    public, tokenizer, _ = load_public(str(world / "public"))
    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))[:1].repeat(2, 1)  # (L, H)
    model = upcycle_full(public, rows)
    masks = freeze_all_but_new_expert(model, low_rank=False)
    docs = [p.read_text() for p in sorted((world / "math").iterdir())]
    blocks = pack(docs, tokenizer, config.seq_len)
    scales = {"model.layers.0.mlp.gate.weight": 0.5}  # a group of its own, with its own lr
    batches = BatchIterator(blocks, config.batch_size, seed=3)
    return Trainer(model, config, batches, blocks[:8], masks=masks, lr_scales=scales), model


def test_resume_is_bit_identical(world: Path, tmp_path: Path) -> None:
    config = replace(TRAIN, steps=8, grad_accum=2)
    straight, a = _fresh(world, config)
    straight.run()
    first, _ = _fresh(world, config)
    first.run(until=4)
    first.save_checkpoint(tmp_path / "ckpt")
    second, b = _fresh(world, config)
    second.load_checkpoint(tmp_path / "ckpt")
    assert second.step == 4
    second.run()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert straight.result().history == second.result().history


def test_bf16_autocast_trains(world: Path) -> None:
    trainer, model = _fresh(world, replace(TRAIN, dtype="bfloat16", steps=3))
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    result = trainer.run()
    after = model.model.layers[0].mlp.experts.gate_up_proj
    assert after.dtype == torch.float32  # autocast: the parameters stay fp32
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    assert result.eval_loss is not None and torch.isfinite(torch.tensor(result.eval_loss))


def test_resume_refuses_another_config(world: Path, tmp_path: Path) -> None:
    trainer, _ = _fresh(world, TRAIN)
    trainer.run(until=1)
    trainer.save_checkpoint(tmp_path / "ckpt")
    other, _ = _fresh(world, replace(TRAIN, lr=2e-2))
    with pytest.raises(ValueError, match=r"TrainConfig\.lr is 0\.02 now but 0\.01 there"):
        other.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", True),
        ("seq_len", 1),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("warmup", 6),
        ("min_lr_ratio", 1.5),
        ("weight_decay", -0.1),
        ("grad_accum", 0),
        ("clip", -1.0),
        ("eval_every", -1),
        ("dtype", "float16"),
        ("device", "tpu"),
        ("seed", -1),
    ],
)
def test_bad_train_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} .*{value!r}"):
        replace(TRAIN, **{field: value})


def test_bad_other_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"PublicModelConfig\.num_attention_heads"):
        replace(TINY, num_attention_heads=3)
    with pytest.raises(ValueError, match=r"PretrainConfig\.heldout_fraction .*1\.0"):
        PretrainConfig(out=tmp_path, heldout_fraction=1.0)
    with pytest.raises(ValueError, match=r"ExpertTrainConfig\.rank .*0"):
        ExpertTrainConfig(public="p", data="d", out=tmp_path, rank=0)
    with pytest.raises(ValueError, match=r"ExpertTrainConfig\.router_scale .*-1"):
        ExpertTrainConfig(public="p", data="d", out=tmp_path, router_scale=-1)
    with pytest.raises(ValueError, match=r"ExpertTrainConfig\.router_lr_ratio .*-0\.5"):
        ExpertTrainConfig(public="p", data="d", out=tmp_path, router_lr_ratio=-0.5)


# ---------------------------------------------------------------- experts


def test_full_expert_freezes_the_public_model(world: Path, tmp_path: Path) -> None:
    result = train_expert(expert_config(world, tmp_path / "full"))
    assert result.expert_loss < result.public_loss
    public = load_file(str(world / "public" / "model.safetensors"))
    trained = load_file(str(tmp_path / "full" / "model.safetensors"))  # per-expert layout on disk
    changed = []
    for key, value in trained.items():
        if ".mlp.experts.1." in key:
            ref = public[key.replace(".experts.1.", ".experts.0.")]
            changed.append(not torch.equal(value, ref))
        elif key.endswith(".mlp.gate.weight"):
            assert torch.equal(value[0], public[key][0]), key  # router row 0: masked and never decayed
            changed.append(not torch.equal(value[1], result.router_init[int(key.split(".")[2])]))
        else:  # attention, embeddings, norms, lm_head, the public expert
            assert torch.equal(value, public[key]), key
    assert changed and all(changed)
    assert public.keys() == {k for k in trained if ".experts.1." not in k}
    # The 2-expert checkpoint is a full expert for compose, which re-checks the public tensors.
    out = compose(
        ComposeConfig(
            public=str(world / "public"),
            experts=(ExpertSpec.parse(f"math={tmp_path / 'full'}#1"),),
            out=tmp_path / "mix",
            format="flexolmo",
            top_k=2,
        )
    )
    ids = torch.randint(1, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits  # type: ignore[misc]
        got = FlexOlmoForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    # ... and `extract` takes it: its delta to the public expert, composed against the 1-expert public.
    extract(ExtractConfig(source=str(tmp_path / "full"), out=tmp_path / "x", names=("math",), max_rank=32))
    spec = ExpertSpec.parse(f"math={tmp_path / 'x' / 'math'}")
    out = compose(ComposeConfig(public=str(world / "public"), experts=(spec,), out=tmp_path / "mix2", top_k=2))

    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)  # rank 32 = min(hidden, intermediate): no truncation


@pytest.mark.parametrize("fmt", ["flexmore", "flexolmo"])
def test_low_rank_expert_composes_to_the_training_model(world: Path, tmp_path: Path, fmt: str) -> None:

    result = train_expert(expert_config(world, tmp_path / "lr", rank=4))
    assert result.expert_loss < result.public_loss
    meta = json.loads((tmp_path / "lr" / "expert.json").read_text())
    assert (meta["svd"], meta["max_rank"], meta["expert_index"]) == ("trained", 4, 1)
    energy = meta["matrices"]["layers.0.up_proj"]["energy"]
    assert list(energy) == ["1", "2", "4"] and energy["4"] == pytest.approx(1.0)
    assert energy["1"] <= energy["2"] <= energy["4"]
    # Frozen: everything but the factors and router row 1 is the public model, bit for bit.
    public = load_public(str(world / "public"))[0].state_dict()  # fused in memory, as the trained model
    model = result.model
    assert model is not None
    for name, p in model.state_dict().items():
        if ".low_rank." in name:
            continue
        if name.endswith(".mlp.gate.weight"):
            assert torch.equal(p[0], public[name][0]), name
            assert not torch.equal(p[1], result.router_init[int(name.split(".")[2])]), name
        else:
            assert torch.equal(p, public[name]), name
    out = compose(
        ComposeConfig(
            public=str(world / "public"),
            experts=(ExpertSpec.parse(f"math={tmp_path / 'lr'}"),),
            out=tmp_path / "mix",
            format=fmt,
            top_k=2,
        )
    )
    ids = torch.randint(1, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


def test_router_row_can_stay_at_its_init(world: Path, tmp_path: Path) -> None:
    result = train_expert(expert_config(world, tmp_path / "x", rank=2, router_lr_ratio=0.0))
    assert result.model is not None and result.router_init is not None
    for L, block in enumerate(result.model.model.layers):
        assert not block.mlp.gate.weight.requires_grad
        assert torch.equal(block.mlp.gate.weight[1], result.router_init[L])
    assert result.expert_loss < result.public_loss


def test_router_bias_is_trained_and_stored(world: Path, tmp_path: Path) -> None:
    result = train_expert(expert_config(world, tmp_path / "x", rank=2, router_bias=True))
    assert result.model is not None
    for block in result.model.model.layers:
        assert block.mlp.gate.bias[0] == 0 and block.mlp.gate.bias[1] != 0  # only the new expert's entry trains
    tensors = load_file(str(tmp_path / "x" / "expert.safetensors"))
    assert all(tensors[f"layers.{L}.router_bias"] <= 0 for L in range(TINY.num_hidden_layers))
    # compose carries the bias: the mixture is the training model, logit for logit.
    spec = (ExpertSpec.parse(f"math={tmp_path / 'x'}"),)
    out = compose(ComposeConfig(public=str(world / "public"), experts=spec, out=tmp_path / "mix", top_k=2))
    ids = torch.randint(1, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    # On its own data the bias rises and min(b, 0) stores 0; a negative one is carried, and refused
    # by the stock FlexOlmo export, which has nowhere to put it.
    shutil.copytree(tmp_path / "x", tmp_path / "neg")
    tensors |= {f"layers.{L}.router_bias": torch.tensor(-0.5) for L in range(TINY.num_hidden_layers)}
    save_file(tensors, str(tmp_path / "neg" / "expert.safetensors"))
    spec = (ExpertSpec.parse(f"math={tmp_path / 'neg'}"),)
    out = compose(ComposeConfig(public=str(world / "public"), experts=spec, out=tmp_path / "negmix", top_k=2))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.router_bias and model.model.layers[0].mlp.gate.bias.tolist() == [0.0, -0.5]
    with pytest.raises(CompositionError, match="negative router bias"):
        compose(ComposeConfig(public=str(world / "public"), experts=spec, out=tmp_path / "d", format="flexolmo"))
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="router_bias needs a low-rank expert"):
        train_expert(expert_config(world, tmp_path / "y", router_bias=True))


def test_router_init_from_an_embedding_function(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_embedder.py").write_text(
        "import torch\ndef embed(docs):\n    return torch.arange(32.0).repeat(len(docs), 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--public", str(world / "public"), "--data", str(world / "math"), "--steps", "2", "--seq-len", "32"]
    args += ["--batch-size", "4", "--rank", "2", "--router-init", "my_embedder:embed", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, ["train-expert", *args])
    assert result.exit_code == 0, result.output
    config = expert_config(world, tmp_path / "y", rank=2, train=replace(TRAIN, steps=2))
    rows = train_expert(config, embed=lambda docs: torch.arange(32.0).repeat(len(docs), 1)).router_init
    assert rows is not None
    direction = torch.arange(32.0) / torch.arange(32.0).norm()
    for row in rows:  # every layer: the mean embedding's direction, scaled per layer
        assert torch.allclose(row / row.norm(), direction, atol=1e-6)
    bad = ["train-expert", *args[:-1], str(tmp_path / "z")]
    bad[bad.index("my_embedder:embed")] = "my_embedder:nothing"
    result = CliRunner().invoke(app, bad)
    assert result.exit_code == 2 and "cannot import" in result.output


def test_interrupted_expert_training_resumes_exactly(world: Path, tmp_path: Path) -> None:
    config = expert_config(world, tmp_path / "a", rank=3, train=replace(TRAIN, checkpoint_every=2))
    train_expert(config)

    def crash(status: object) -> None:
        if getattr(status, "step", 0) == 3:
            raise KeyboardInterrupt

    resumed = replace(config, out=tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train_expert(resumed, crash)
    assert not (tmp_path / "b").exists() and (checkpoint_dir_for(tmp_path / "b") / "trainer.json").is_file()
    train_expert(resumed)
    a, b = load_file(str(tmp_path / "a" / "expert.safetensors")), load_file(str(tmp_path / "b" / "expert.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not checkpoint_dir_for(tmp_path / "b").exists()


def test_refactorize_orders_by_singular_value() -> None:
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 12, generator=gen), torch.randn(9, 5, generator=gen)
    A2, B2, S = refactorize(A, B)
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-5)
    assert torch.all(S[:-1] >= S[1:])
    best = torch.linalg.svd(B @ A)
    rank2 = (best.U[:, :2] * best.S[:2]) @ best.Vh[:2]
    assert torch.allclose(B2[:, :2] @ A2[:2], rank2, atol=1e-5)


def test_cli_pretrain_and_train_expert(world: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    tiny = ["--vocab-size", "300", "--hidden-size", "16", "--intermediate-size", "32", "--layers", "1", "--heads", "2"]
    result = runner.invoke(
        app, ["pretrain", "--out", str(tmp_path / "p"), "--data", str(world / "general"), *args, *tiny]
    )
    assert result.exit_code == 0, result.output
    assert "held-out loss" in result.output
    result = runner.invoke(
        app,
        ["train-expert", "--public", str(tmp_path / "p"), "--data", str(world / "math"), "--out",
         str(tmp_path / "x"), "--rank", "2", *args],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x" / "expert.json").is_file() and "(public + expert)" in result.output
    again = [
        "train-expert",
        "--public",
        str(tmp_path / "p"),
        "--data",
        str(world / "math"),
        "--out",
        str(tmp_path / "x"),
    ]
    result = runner.invoke(app, again)
    assert result.exit_code == 2 and "already exists" in result.output
