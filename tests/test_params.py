"""`flexmore params` against the paper's totals (Tables 1 and 2), from the FlexOlmo 7x7B config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import FlexOlmoConfig
from typer.testing import CliRunner

from flexmore.analysis.params import count, mixture_config, parse_ranks
from flexmore.cli import app

FULL_7B = 4_328_521_728  # 3 x 32 x 4096 x 11008
PER_RANK_7B = 1_449_984  # 3 x 32 x (4096 + 11008)


@pytest.fixture(scope="module")
def config_7x7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flexolmo-7x7b")
    FlexOlmoConfig().save_pretrained(folder)  # transformers' defaults are the 7x7B model
    return folder / "config.json"


def params_json(config: Path, ranks: str, *extra: str) -> dict:
    result = CliRunner().invoke(app, ["params", str(config), "--expert-ranks", ranks, "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("ranks", "paper_total", "exact_total"),
    [
        ("full,full,full,full,full,full,full", "33.27B", 33_270_665_216),  # FlexOlmo 7x7B
        ("full,64,128,2048,1,8,128", "10.75B", 10_746_146_816),  # heterogeneous, MC9
        ("full,512,16,2048,2048,64,512", "14.84B", 14_839_451_648),  # heterogeneous, all
        ("full,512,512,512,512,512,512", "11.75B", 11_753_885_696),  # homogeneous 2^9
        ("full,1024,1024,1024,1024,1024,1024", "16.21B", 16_208_236_544),  # homogeneous 2^10
        ("full,512", "8.04B", 8_041_271_296),  # 2x7B, Code r=2^9 (Table 1)
        ("full,full", "11.63B", 11_627_401_216),  # 2x7B baseline
    ],
)
def test_paper_totals(config_7x7b: Path, ranks: str, paper_total: str, exact_total: int) -> None:
    report = params_json(config_7x7b, ranks)
    assert report["total"] == exact_total
    assert f"{report['total'] / 1e9:.2f}B" == paper_total
    assert report["total"] == report["non_expert"] + sum(report["experts"])
    for rank, n in zip(parse_ranks(ranks), report["experts"], strict=True):
        assert n == (FULL_7B if rank is None else rank * PER_RANK_7B)


def test_expert_sizes_of_table_1(config_7x7b: Path) -> None:
    # Table 1 reports expert sizes 743M (r=2^9), 23.3M (r=2^4), 2.97B (r=2^11), 92.9M (r=2^6): the
    # factors plus the expert's router row (4096 x 32), which we count as non-expert.
    report = params_json(config_7x7b, "full,512,16,2048,64")
    assert [round(n / 1e6, 1) for n in report["experts"][1:]] == [742.4, 23.2, 2969.6, 92.8]
    router_row = 4096 * 32
    with_router = [n + router_row for n in report["experts"][1:]]
    assert [f"{with_router[0] / 1e6:.0f}M", f"{with_router[1] / 1e6:.1f}M"] == ["743M", "23.3M"]
    assert [f"{with_router[2] / 1e9:.2f}B", f"{with_router[3] / 1e6:.1f}M"] == ["2.97B", "92.9M"]


def test_flops(config_7x7b: Path) -> None:
    report = params_json(config_7x7b, "full,64,128,2048,1,8,128", "--active", "7")
    H, I, L, E = 4096, 11008, 32, 7
    router = 2 * E * H
    assert report["active"] == 7
    assert report["flexolmo_ffn_flops"] == L * (router + 7 * 6 * H * I)
    # All seven active: the public expert once, plus every low-rank term.
    expected = L * (router + 6 * H * I + 6 * (64 + 128 + 2048 + 1 + 8 + 128) * (H + I))
    assert report["flexmore_ffn_flops_min"] == report["flexmore_ffn_flops_max"] == expected
    assert report["flexmore_ffn_flops_max"] / report["flexolmo_ffn_flops"] < 0.35


def test_table_output(config_7x7b: Path) -> None:
    result = CliRunner().invoke(app, ["params", str(config_7x7b), "--expert-ranks", "full,64,128"])
    assert result.exit_code == 0, result.output
    assert "total" in result.stdout and "4,328,521,728" in result.stdout


@pytest.mark.parametrize("bad", ["full,abc", "full,0", "full,-4", "full,5000"])
def test_bad_ranks(config_7x7b: Path, bad: str) -> None:
    result = CliRunner().invoke(app, ["params", str(config_7x7b), "--expert-ranks", bad])
    assert result.exit_code == 2
    assert "error" in result.output


def test_count_from_dict() -> None:
    cfg = FlexOlmoConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        num_experts=3,
        pad_token_id=0,
        eos_token_id=1,
    )
    report = count(mixture_config(cfg.to_dict(), [None, 4, None]))
    assert report.experts == [3 * 2 * 64 * 96, 4 * 3 * 2 * (64 + 96), 3 * 2 * 64 * 96]
