"""The demo's report logic on a fixed table: the paper's claims are checked, with their noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexmore.analysis.scores import PointScores
from flexmore.demo import BASELINE, DemoConfig, Recipe, findings, run_demo

GROUPS = ("code", "math")


def point(mixture: str, expert: str | None, rank: int | None, active: int, s: float, params: int) -> PointScores:
    return PointScores(mixture, expert, rank, active, dict.fromkeys(GROUPS, s), params=params)


def test_findings_compare_with_two_standard_errors() -> None:
    points = [
        point("code@full", "code", None, 2, 0.40, 200),
        point("code@4", "code", 4, 2, 0.60, 110),  # +0.20: far outside noise at n=100
        point("math@full", "math", None, 2, 0.40, 200),
        point("math@4", "math", 4, 2, 0.41, 110),  # +0.01: within noise
        point(BASELINE, None, None, 2, 0.50, 300),
        point("homo-4", None, None, 2, 0.50, 130),
        point("hetero-avg", None, None, 2, 0.30, 120),
    ]
    plan = [Recipe("homo-4", {"code": 4, "math": 4}, ""), Recipe("hetero-avg", {"code": 4, "math": 2}, "")]
    low, homo, base = findings(points, plan, n=100).values()
    # 2 SE of a difference of two Avgs over 2 groups at p = 0.4 and 0.6, n = 100: 2 sqrt(4 * 0.24 / 100) / 2
    assert low[0] == "code, Avg: r=4 0.6000 vs full 0.4000: higher (+0.2000, |d| > 2 SE 0.0980)"
    assert low[1] == "code, own domain: r=4 0.6000 vs full 0.4000: higher (+0.2000, |d| > 2 SE 0.1386)"
    assert low[2].startswith("math, Avg: r=4 0.4100 vs full 0.4000: within noise (+0.0100, |d| < 2 SE")
    assert len(low) == 4
    assert base == ["a2: hetero-avg (0.00M) 0.3000 vs flexolmo (0.00M) 0.5000: lower (-0.2000, |d| > 2 SE 0.0959)"]
    # 2 sqrt((2 * 0.21 + 2 * 0.25) / 100) / 2 = 0.0959. The peer is the cheapest homogeneous mixture
    # with at least hetero-avg's 120 parameters: homo-4 (130).
    assert homo == ["a2: hetero-avg (0.00M) 0.3000 vs homo-4 (0.00M) 0.5000: lower (-0.2000, |d| > 2 SE 0.0959)"]


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    first = DemoConfig(out=tmp_path, seed=1)
    (tmp_path / "demo.json").write_text(json.dumps(first.settings()))
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run_demo(DemoConfig(out=tmp_path, seed=0), print)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]  # nothing started
    with pytest.raises(ValueError, match="client_cpus"):
        DemoConfig(client_cpus=0)
