"""`flexmore compose`: mixtures from a public checkpoint and expert folders, against stock transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FlexOlmoForCausalLM
from typer.testing import CliRunner

from flexmore.cli import app
from flexmore.lowrank.extract import ExtractConfig, extract
from flexmore.mixture.compose import ComposeConfig, CompositionError, ExpertSpec, compose
from flexmore.toy import save_tiny_flexolmo, tiny_config

FULL = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-expert FlexOlmo and its two domain experts extracted at full rank (max rank 64)."""
    root = tmp_path_factory.mktemp("world")
    save_tiny_flexolmo(root / "src", tiny_config(3), seed=3)
    (root / "src" / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    extract(ExtractConfig(source=str(root / "src"), out=root / "x", names=("code", "math"), max_rank=FULL))
    return root


def ids() -> torch.Tensor:
    return torch.randint(2, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def stock_logits(folder: Path, top_k: int) -> torch.Tensor:
    model = FlexOlmoForCausalLM.from_pretrained(folder, num_experts_per_tok=top_k).eval()
    with torch.no_grad():
        return model(ids()).logits


def run(world: Path, out: Path, experts: list[str], **kw: object) -> Path:
    specs = tuple(ExpertSpec.parse(e) for e in experts)
    return compose(ComposeConfig(public=str(world / "src"), experts=specs, out=out, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_full_rank_flexolmo_export_equals_original(world: Path, tmp_path: Path, top_k: int) -> None:
    out = run(
        world,
        tmp_path / "m",
        [f"code={world / 'x' / 'code'}", f"math={world / 'x' / 'math'}"],
        format="flexolmo",
        top_k=top_k,
    )
    diff = (stock_logits(out, top_k) - stock_logits(world / "src", top_k)).abs().max()
    assert diff <= 1e-4, float(diff)


def test_full_experts_from_checkpoint(world: Path, tmp_path: Path) -> None:
    out = run(world, tmp_path / "m", [f"code={world / 'src'}#1", f"math={world / 'src'}#2"], format="flexolmo")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(world / "src" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_recipe_tokenizer_and_sharding(world: Path, tmp_path: Path) -> None:
    out = run(world, tmp_path / "m", [f"math={world / 'x' / 'math'}@5"], format="flexolmo", max_shard_size=60_000)
    recipe = json.loads((out / "flexmore_recipe.json").read_text())
    assert [e["name"] for e in recipe["experts"]] == ["public", "math"]
    assert recipe["experts"][1]["rank"] == 5 and len(recipe["public"]["sha256"]) == 64
    assert (out / "tokenizer_config.json").read_text() == (world / "src" / "tokenizer_config.json").read_text()
    assert (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["model_type"]) == (2, "flex_olmo")
    FlexOlmoForCausalLM.from_pretrained(out)  # loads as a stock model


def test_low_rank_export_is_public_plus_BA(world: Path, tmp_path: Path) -> None:
    from flexmore.lowrank.expert import load_expert
    from flexmore.storage import FlexOlmoCheckpoint

    out = run(world, tmp_path / "m", [f"math={world / 'x' / 'math'}@7"], format="flexolmo")
    composed, public = FlexOlmoCheckpoint(out), FlexOlmoCheckpoint(world / "src")
    expert = load_expert(world / "x" / "math", 7)
    for (layer, proj), (A, B) in expert.factors.items():
        expected = public.expert_weight(layer, 0, proj) + B @ A
        assert torch.allclose(composed.expert_weight(layer, 1, proj), expected, atol=1e-6)
    assert torch.equal(composed.router(1)[1], public.router(1)[2])


# -- errors -----------------------------------------------------------------------------------------


def test_other_public_model_is_named(world: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    save_tiny_flexolmo(other, tiny_config(3), seed=3)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] += 0.5
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    extract(ExtractConfig(source=str(other), out=tmp_path / "ox", experts=(1,), names=("alien",), max_rank=8))
    with pytest.raises(
        CompositionError, match=r"alien.*not built on this public model.*model\.layers\.1\.self_attn\.k_proj"
    ):
        run(world, tmp_path / "m", [f"alien={tmp_path / 'ox' / 'alien'}"])
    with pytest.raises(CompositionError, match=r"first at tensor model\.layers\.1\.self_attn\.k_proj"):
        run(world, tmp_path / "m", [f"alien={other}#1"])
    assert not (tmp_path / "m").exists()


def test_dimension_mismatch(world: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    save_tiny_flexolmo(small, tiny_config(2, intermediate_size=80))
    extract(ExtractConfig(source=str(small), out=tmp_path / "sx", names=("s",), max_rank=4))
    with pytest.raises(CompositionError, match=r"'s'.*\(64, 80, 2\).*\(64, 96, 2\)"):
        run(world, tmp_path / "m", [f"s={tmp_path / 'sx' / 's'}"])


@pytest.mark.parametrize(
    ("experts", "kw", "message"),
    [
        (["code=X", "code=X"], {}, "unique; repeated: code"),
        (["public=X"], {}, "unique; repeated: public"),
        (["code=X@65"], {}, r"rank must be in \[1, 64\]"),
        (["code=SRC#3"], {}, r"experts \[0, 2\], got #3"),
        (["code=X"], {"top_k": 3}, r"top_k must be in \[1, 2\]"),
        (["code=X"], {"format": "gguf"}, "format must be one of"),
    ],
)
def test_bad_compositions(world: Path, tmp_path: Path, experts: list[str], kw: dict, message: str) -> None:
    experts = [e.replace("=X", f"={world / 'x' / 'code'}").replace("=SRC", f"={world / 'src'}") for e in experts]
    with pytest.raises(CompositionError, match=message):
        run(world, tmp_path / "m", experts, **kw)
    assert not (tmp_path / "m").exists()


def test_bad_spec() -> None:
    with pytest.raises(CompositionError, match="expected NAME=DIR"):
        ExpertSpec.parse("no-equals-sign")
    assert ExpertSpec.parse("m=/a/b@12") == ExpertSpec("m", "/a/b", rank=12)
    assert ExpertSpec.parse("m=org/repo#1") == ExpertSpec("m", "org/repo", index=1)


def test_cli(world: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "compose",
            "--public",
            str(world / "src"),
            "--expert",
            f"math={world / 'x' / 'math'}@9",
            "--out",
            str(tmp_path / "m"),
            "--format",
            "flexolmo",
            "--top-k",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_experts_per_tok"] == 1
    result = CliRunner().invoke(
        app, ["compose", "--public", str(world / "src"), "--expert", "math", "--out", str(tmp_path / "n")]
    )
    assert result.exit_code == 2 and "expected NAME=DIR" in result.output


# -- the flexmore format, loaded by FlexMoReForCausalLM -----------------------------------------------


def flexmore_model(folder: Path, top_k: int | None = None):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    import flexmore.mixture  # noqa: F401 - registers model_type "flexmore"

    kwargs = {} if top_k is None else {"num_experts_per_tok": top_k}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("how", ["low-rank at full rank", "full from checkpoint"])
def test_flexmore_at_full_rank_equals_stock_flexolmo(world: Path, tmp_path: Path, top_k: int, how: str) -> None:
    if how == "full from checkpoint":
        experts = [f"code={world / 'src'}#1", f"math={world / 'src'}#2"]
    else:
        experts = [f"code={world / 'x' / 'code'}", f"math={world / 'x' / 'math'}"]
    out = run(world, tmp_path / "m", experts, top_k=top_k)
    model = flexmore_model(out)
    assert type(model).__name__ == "FlexMoReForCausalLM"
    assert model.config.expert_names == ["public", "code", "math"]
    with torch.no_grad():
        ours = model(ids()).logits
    diff = (ours - stock_logits(world / "src", top_k)).abs().max()
    assert diff <= 1e-4, float(diff)


def test_heterogeneous_flexmore_equals_its_flexolmo_export(world: Path, tmp_path: Path) -> None:
    experts = [f"code={world / 'x' / 'code'}@3", f"math={world / 'x' / 'math'}@17"]
    ours = flexmore_model(run(world, tmp_path / "ours", experts, top_k=2))
    stock = FlexOlmoForCausalLM.from_pretrained(run(world, tmp_path / "dense", experts, top_k=2, format="flexolmo"))
    assert ours.config.expert_ranks == [None, 3, 17]
    assert sum(p.numel() for p in ours.parameters()) < sum(p.numel() for p in stock.parameters())
    with torch.no_grad():
        diff = (ours(ids()).logits - stock.eval()(ids()).logits).abs().max()
    assert diff <= 1e-4, float(diff)
    prompt = ids()[:, :5]
    a = ours.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    b = stock.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert a.shape == (2, 25) and torch.equal(a, b)


def test_opt_out_equals_mixture_composed_without_the_expert(world: Path, tmp_path: Path) -> None:
    both = flexmore_model(
        run(world, tmp_path / "both", [f"code={world / 'x' / 'code'}@5", f"math={world / 'x' / 'math'}@9"], top_k=2)
    )
    without = flexmore_model(run(world, tmp_path / "without", [f"math={world / 'x' / 'math'}@9"], top_k=2))
    both.set_active_experts(["public", "math"])
    with torch.no_grad():
        diff = (both(ids()).logits - without(ids()).logits).abs().max()
    assert diff <= 1e-5, float(diff)
    both.set_active_experts(None)
    with torch.no_grad():
        assert (both(ids()).logits - without(ids()).logits).abs().max() > 1e-3  # code is back in play
