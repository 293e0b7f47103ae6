"""PHLoRA extraction on tiny FlexOlmo checkpoints built from configs and saved with save_pretrained."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flexmore.lowrank.expert import ExpertFileError, load_expert
from flexmore.lowrank.extract import ExtractConfig, extract, useful_max_rank
from flexmore.lowrank.svd import factorize
from flexmore.storage import CheckpointError, FlexOlmoCheckpoint
from flexmore.toy import save_tiny_flexolmo, tiny_config

BACKENDS = ["exact", "randomized", "gram", "auto"]
FULL = 64  # min(hidden 64, intermediate 96)


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flexolmo3")
    save_tiny_flexolmo(folder, tiny_config(3), seed=0)
    return folder


@pytest.fixture(scope="module")
def ckpt2_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flexolmo2")
    save_tiny_flexolmo(folder, tiny_config(2), seed=1, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


def deltas(folder: Path, expert: int) -> dict[tuple[int, str], torch.Tensor]:
    ckpt = FlexOlmoCheckpoint(folder)
    return {
        (layer, proj): ckpt.expert_weight(layer, expert, proj) - ckpt.expert_weight(layer, 0, proj)
        for layer in range(ckpt.num_layers)
        for proj in ("gate_proj", "up_proj", "down_proj")
    }


def run(source: Path, out: Path, **kw: object) -> list[Path]:
    return extract(ExtractConfig(source=str(source), out=out, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["ckpt3", "ckpt2_sharded"])
def test_full_rank_reconstructs_delta(which: str, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    source = request.getfixturevalue(which)
    written = run(source, tmp_path, max_rank=FULL, svd=backend)
    for folder in written:
        expert = load_expert(folder)
        assert expert.rank == FULL
        for key, delta in deltas(source, expert.meta.expert_index).items():
            err = (expert.delta(*key) - delta).abs().max()
            assert err <= 1e-5 * delta.abs().max(), (key, float(err))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 5, 16, 40])
def test_truncation_error_is_eckart_young_optimum(ckpt3: Path, backend: str, rank: int, tmp_path: Path) -> None:
    for folder in run(ckpt3, tmp_path, max_rank=rank, svd=backend):
        expert = load_expert(folder)
        for key, delta in deltas(ckpt3, expert.meta.expert_index).items():
            S = torch.linalg.svdvals(delta.double())
            optimum = S[rank:].square().sum().sqrt()
            err = torch.linalg.norm((delta - expert.delta(*key)).double())
            assert abs(float(err / optimum) - 1) <= 1e-4, (key, float(err), float(optimum))


@pytest.mark.parametrize("backend", ["exact", "gram"])
def test_prefix_equals_direct_extraction(ckpt3: Path, backend: str, tmp_path: Path) -> None:
    big = run(ckpt3, tmp_path / "big", max_rank=48, svd=backend)
    for rank in (1, 7, 32):
        small = run(ckpt3, tmp_path / f"r{rank}", max_rank=rank, svd=backend)
        for b, s in zip(big, small, strict=True):
            prefix, direct = load_expert(b, rank), load_expert(s)
            assert prefix.rank == direct.rank == rank
            for key in direct.factors:
                diff = (prefix.delta(*key) - direct.delta(*key)).abs().max()
                assert diff <= 1e-5 * direct.delta(*key).abs().max(), (rank, key, float(diff))


def test_randomized_prefix_is_near_optimal(ckpt3: Path, tmp_path: Path) -> None:
    # A randomized sketch of rank 48 also serves rank 7 within the tolerance of a direct rank-7 one.
    (folder, *_) = run(ckpt3, tmp_path, max_rank=48, svd="randomized")
    expert = load_expert(folder, 7)
    for key, delta in deltas(ckpt3, expert.meta.expert_index).items():
        optimum = torch.linalg.svdvals(delta.double())[7:].square().sum().sqrt()
        assert float(torch.linalg.norm((delta - expert.delta(*key)).double()) / optimum) - 1 <= 1e-4


def test_output_format(ckpt3: Path, tmp_path: Path) -> None:
    written = run(ckpt3, tmp_path, experts=(2,), names=("math",), max_rank=16, svd="exact")
    assert written == [tmp_path / "math"]
    meta = json.loads((tmp_path / "math" / "expert.json").read_text())
    assert meta["format"] == "flexmore-expert" and meta["format_version"] == 1
    assert (meta["public_expert"], meta["expert_index"], meta["max_rank"]) == (0, 2, 16)
    assert meta["shapes"] == {"gate_proj": [96, 64], "up_proj": [96, 64], "down_proj": [64, 96]}
    energy = meta["matrices"]["layers.1.down_proj"]["energy"]
    assert list(energy) == ["1", "2", "4", "8", "16"]
    values = list(energy.values())
    assert all(0 < a <= b <= 1 for a, b in itertools.pairwise(values))
    S = torch.linalg.svdvals(deltas(ckpt3, 2)[(1, "down_proj")].double())
    assert energy["4"] == pytest.approx(float(S[:4].square().sum() / S.square().sum()), rel=1e-5)
    tensors = load_file(str(tmp_path / "math" / "expert.safetensors"))
    assert tensors["layers.0.gate_proj.lora_A"].shape == (16, 64)
    assert tensors["layers.0.gate_proj.lora_B"].shape == (96, 16)
    assert tensors["layers.0.down_proj.lora_A"].shape == (16, 96)
    assert tensors["layers.0.down_proj.lora_B"].shape == (64, 16)
    router = FlexOlmoCheckpoint(ckpt3).router(1)
    assert torch.equal(tensors["layers.1.router"], router[2])
    assert not list(tmp_path.glob(".*")), "no temporary folder left behind"


def test_fused_layout_reads_like_per_expert(ckpt3: Path, tmp_path: Path) -> None:
    from transformers import FlexOlmoForCausalLM

    fused = tmp_path / "fused"
    fused.mkdir()
    model = FlexOlmoForCausalLM.from_pretrained(ckpt3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((ckpt3 / "config.json").read_text())
    with safe_open(str(fused / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    a = run(ckpt3, tmp_path / "a", max_rank=8, svd="exact")
    b = run(fused, tmp_path / "b", max_rank=8, svd="exact")
    for x, y in zip(a, b, strict=True):
        # Same public model in another layout: same identity.
        assert load_expert(x).meta.public_digest == load_expert(y).meta.public_digest
        assert load_expert(x).meta.public_sha256 == load_expert(y).meta.public_sha256 != ""
        ta, tb = load_file(str(x / "expert.safetensors")), load_file(str(y / "expert.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


def test_public_digest_names_the_changed_tensor(ckpt3: Path, tmp_path: Path) -> None:
    from flexmore.storage import first_difference, public_digest

    digest = public_digest(FlexOlmoCheckpoint(ckpt3))
    assert "model.layers.1.mlp.experts.public.down_proj.weight" in digest
    assert not any(k.endswith("mlp.gate.weight") for k in digest)
    other = tmp_path / "other"
    save_tiny_flexolmo(other, tiny_config(3), seed=0)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"][0] += 1e-3
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    changed = public_digest(FlexOlmoCheckpoint(other))
    assert first_difference(digest, changed) == "model.layers.0.self_attn.q_norm.weight"


def test_useful_max_rank() -> None:
    assert useful_max_rank(4096, 11008) == 2048  # break-even ~2985
    assert useful_max_rank(64, 96) == 32


# -- bad input: a clear error, naming the file/tensor, and nothing written ---------------------------


def _rewrite_shard(folder: Path, key: str, value: torch.Tensor | None) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    file = folder / index["weight_map"][key]
    tensors = load_file(str(file))
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    save_tiny_flexolmo(folder, tiny_config(3), seed=2, max_shard_size="40KB")
    return folder


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_missing_expert_tensor(broken: Path, tmp_path: Path) -> None:
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    _rewrite_shard(broken, key, None)
    index = broken / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.2\.up_proj"):
        run(broken, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_shape_mismatch(broken: Path, tmp_path: Path) -> None:
    key = "model.layers.0.mlp.experts.1.down_proj.weight"
    file = _rewrite_shard(broken, key, torch.zeros(64, 80))
    with pytest.raises(CheckpointError, match=rf"{file.name}.*{key}.*\(64, 80\).*\(64, 96\)"):
        run(broken, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_nan_in_delta(broken: Path, tmp_path: Path) -> None:
    key = "model.layers.1.mlp.experts.2.gate_proj.weight"
    value = FlexOlmoCheckpoint(broken).tensor(key).clone()
    value[3, 4] = float("nan")
    _rewrite_shard(broken, key, value)
    with pytest.raises(CheckpointError, match=r"NaN/Inf.*expert 2.*layers\.1\.gate_proj"):
        run(broken, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_corrupt_safetensors(broken: Path, tmp_path: Path) -> None:
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    file = broken / index["weight_map"]["model.layers.1.mlp.experts.1.gate_proj.weight"]
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{file.name}"):
        run(broken, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_fewer_than_two_experts(tmp_path: Path) -> None:
    save_tiny_flexolmo(tmp_path / "one", tiny_config(1))
    with pytest.raises(CheckpointError, match="has 1 expert"):
        run(tmp_path / "one", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("rank", [0, -3, FULL + 1])
def test_rank_out_of_range(ckpt3: Path, tmp_path: Path, rank: int) -> None:
    with pytest.raises(ValueError, match=rf"max_rank must be in \[1, {FULL}\]"):
        run(ckpt3, tmp_path / "out", max_rank=rank)
    assert_nothing_written(tmp_path / "out")


def test_prefix_rank_out_of_range(ckpt3: Path, tmp_path: Path) -> None:
    (folder, *_) = run(ckpt3, tmp_path, max_rank=8)
    with pytest.raises(ExpertFileError, match=r"rank must be in \[1, 8\]"):
        load_expert(folder, 9)


def test_existing_output_is_kept(ckpt3: Path, tmp_path: Path) -> None:
    run(ckpt3, tmp_path, experts=(1,), max_rank=4)
    before = (tmp_path / "1" / "expert.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        run(ckpt3, tmp_path, experts=(1,), max_rank=8)
    assert (tmp_path / "1" / "expert.safetensors").read_bytes() == before
    run(ckpt3, tmp_path, experts=(1,), max_rank=8, overwrite=True)
    assert load_expert(tmp_path / "1").rank == 8


def test_factorize_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\]"):
        factorize(torch.randn(3, 5), 4)


def test_hub_id_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flexmore.storage import resolve_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Flex-nope-2x7B: not a local folder, and the hub download failed"):
        resolve_source("allenai/Flex-nope-2x7B")
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_source(str(tmp_path / "missing" / "deeper"))
