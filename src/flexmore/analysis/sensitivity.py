"""Rank sensitivity (paper section 3.3, Appendix B): s(r) = alpha + beta log2 r, and typical peak rank.

A *curve* is one family's score per rank in one group: a sweep expert (public + that expert at each
rank, paper Tables 7-8) or the homogeneous mixtures `homo-R` at one active count (Table 6). Full-size
points (rank None) are baselines, not ranks, and stay out of fits and peaks. The pseudo-group "Avg"
is the unweighted mean of group means, taken only at ranks that have every group of the family.

Quartiles use numpy's default (linear interpolation between order statistics, "type 7"): for the
log2 peak ranks 4, 6, 9, 9, 11, 11 that gives median 9, Q25 6.75, Q75 10.5 (paper Table 9, Avg).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from flexmore.analysis.scores import AVG, PointScores, all_groups, average

HOMOGENEOUS = re.compile(r"^homo-(?P<rank>\d+)$")


@dataclass(frozen=True)
class Fit:
    """Least squares s(r) = alpha + beta log2 r over n points; pearson is None when the scores are constant."""

    alpha: float
    beta: float
    pearson: float | None
    n: int


def fit_log2(ranks: Sequence[int], scores: Sequence[float]) -> Fit | None:
    """The least-squares line in log2 rank, or None with fewer than two distinct ranks (no line)."""
    if len(ranks) != len(scores):
        raise ValueError(f"fit: {len(ranks)} ranks but {len(scores)} scores")
    if any(r < 1 for r in ranks):
        raise ValueError(f"fit: ranks must be >= 1, got {sorted(ranks)}")
    if len(set(ranks)) < 2:
        return None
    x = np.log2(np.asarray(ranks, dtype=np.float64))
    y = np.asarray(scores, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    beta = sxy / sxx
    alpha = float(y.mean()) - beta * float(x.mean())
    pearson = sxy / math.sqrt(sxx * syy) if syy > 0 else None
    return Fit(alpha=alpha, beta=beta, pearson=pearson, n=len(ranks))


def peak_rank(scores: Mapping[int, float]) -> int:
    """argmax over the observed ranks, the lowest rank on ties (no smoothing)."""
    if not scores:
        raise ValueError("peak rank of no scores")
    best = max(scores.values())
    return min(r for r, s in scores.items() if s == best)


@dataclass(frozen=True)
class Quartiles:
    median: float
    q25: float
    q75: float
    n: int


def quartiles(values: Iterable[float]) -> Quartiles:
    """Median and IQR with numpy's default linear interpolation."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("quartiles of no values")
    q25, median, q75 = np.percentile(v, [25, 50, 75])
    return Quartiles(median=float(median), q25=float(q25), q75=float(q75), n=int(v.size))


@dataclass(frozen=True)
class Curve:
    family: str  # an expert name, or "homo" for the homogeneous mixtures
    kind: str  # "expert" | "homogeneous"
    active: int
    group: str  # a group name or "Avg"
    scores: dict[int, float]  # rank -> score

    @property
    def label(self) -> str:
        return f"{self.family} a{self.active}" if self.kind == "homogeneous" else self.family


def _family(p: PointScores) -> tuple[str, str, int] | None:
    """(family, kind, rank) of a ranked point; None for full-size points and other mixtures."""
    if p.expert is not None:
        return None if p.rank is None else (p.expert, "expert", p.rank)
    m = HOMOGENEOUS.match(p.mixture)
    return ("homo", "homogeneous", int(m["rank"])) if m else None


def curves(points: Iterable[PointScores]) -> list[Curve]:
    """Every (family, active, group) curve, Avg included, in first-seen order."""
    by_family: dict[tuple[str, str, int], dict[int, PointScores]] = defaultdict(dict)
    for p in points:
        fam = _family(p)
        if fam is not None:
            by_family[(fam[0], fam[1], p.active)][fam[2]] = p
    out: list[Curve] = []
    for (family, kind, active), at_rank in by_family.items():
        groups = all_groups(at_rank.values())
        for g in groups:
            scores = {r: p.groups[g] for r, p in sorted(at_rank.items()) if g in p.groups}
            out.append(Curve(family, kind, active, g, scores))
        complete = {r: average(p.groups, groups) for r, p in sorted(at_rank.items()) if set(groups) <= set(p.groups)}
        if complete:
            out.append(Curve(family, kind, active, AVG, complete))
    return out


@dataclass(frozen=True)
class SensitivityRow:
    """One row of paper Tables 6-8: the fit of one curve, or why there is none."""

    family: str
    kind: str
    active: int
    group: str
    fit: Fit | None
    peak: int
    n: int

    @property
    def note(self) -> str:
        if self.fit is None:
            return f"no fit: {self.n} rank point" + ("" if self.n == 1 else "s")
        return "constant scores: Pearson r undefined" if self.fit.pearson is None else ""


def sensitivity(points: Iterable[PointScores]) -> list[SensitivityRow]:
    rows = []
    for c in curves(points):
        ranks, scores = list(c.scores), list(c.scores.values())
        rows.append(
            SensitivityRow(
                c.family, c.kind, c.active, c.group, fit_log2(ranks, scores), peak_rank(c.scores), len(ranks)
            )
        )
    return rows


@dataclass(frozen=True)
class SlopeSummary:
    """Paper Table 5: median, min and max slope of one family over its groups (Avg excluded)."""

    family: str
    kind: str
    active: int
    median: float
    min: float
    max: float
    n_groups: int


def slope_summary(rows: Iterable[SensitivityRow]) -> list[SlopeSummary]:
    slopes: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r.group != AVG and r.fit is not None:
            slopes[(r.family, r.kind, r.active)].append(r.fit.beta)
    return [SlopeSummary(f, k, a, float(np.median(b)), min(b), max(b), len(b)) for (f, k, a), b in slopes.items()]


@dataclass(frozen=True)
class PeakSummary:
    """Paper Table 9: median and IQR of log2 r* across the experts, per group (and active count)."""

    group: str
    active: int
    log2: Quartiles
    peaks: dict[str, int]  # expert -> r*


def peak_summary(rows: Iterable[SensitivityRow]) -> list[PeakSummary]:
    peaks: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    for r in rows:
        if r.kind == "expert":
            peaks[(r.group, r.active)][r.family] = r.peak
    return [
        PeakSummary(g, a, quartiles(math.log2(r) for r in by_expert.values()), by_expert)
        for (g, a), by_expert in peaks.items()
    ]
