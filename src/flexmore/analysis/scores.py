"""Score aggregation, in one place: group means, Avg and Delta% (paper section 4.2).

A group's score for one evaluated point (mixture, expert, rank, active) is the mean of its tasks'
scores; Avg is the unweighted mean of the group means; Delta% = 100 (Avg - Avg_base) / Avg_base.
Every score in the results store is higher-is-better, so nothing here needs a direction.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from flexmore.evaluation.store import Result

AVG = "Avg"  # the pseudo-group name of the unweighted mean of group means


def mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def group_means(task_scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{group: {task: score}} -> {group: mean of its tasks}."""
    return {g: mean(tasks.values()) for g, tasks in task_scores.items() if tasks}


def average(groups: Mapping[str, float], required: Sequence[str] | None = None) -> float:
    """Avg: the unweighted mean of the group means. With `required`, exactly those groups count and a
    missing one is an error (an Avg over fewer groups is not comparable)."""
    if required is not None:
        missing = [g for g in required if g not in groups]
        if missing:
            raise ValueError(f"Avg needs groups {list(required)}; missing {missing}")
        return mean(groups[g] for g in required)
    if not groups:
        raise ValueError("Avg of no groups")
    return mean(groups.values())


def delta_pct(avg: float, base: float) -> float:
    """Relative improvement in percent: 100 (avg - base) / base."""
    if base == 0:
        raise ValueError("Delta%: the baseline Avg is 0")
    return 100.0 * (avg - base) / base


PointKey = tuple[str, str | None, int | None, int]  # (mixture, expert, rank, active)


@dataclass(frozen=True)
class PointScores:
    """One evaluated point with its group means."""

    mixture: str
    expert: str | None
    rank: int | None
    active: int
    groups: dict[str, float]  # group -> mean of its tasks' scores
    tasks: dict[str, int] = field(default_factory=dict)  # group -> number of tasks behind the mean
    params: int | None = None

    @property
    def key(self) -> PointKey:
        return (self.mixture, self.expert, self.rank, self.active)

    @property
    def is_sweep(self) -> bool:
        """A sweep point: one public + one expert (at a rank, or full-size)."""
        return self.expert is not None

    def avg(self, required: Sequence[str] | None = None) -> float:
        return average(self.groups, required)

    def score(self, group: str, required: Sequence[str] | None = None) -> float:
        """A group's mean, or Avg for group == "Avg" (case-insensitive)."""
        if group.lower() == AVG.lower():
            return self.avg(required)
        if group not in self.groups:
            raise ValueError(f"{self.label}: no scores for group {group!r}; it has {sorted(self.groups)}")
        return self.groups[group]

    @property
    def label(self) -> str:
        if self.expert is None:
            return f"{self.mixture} (a{self.active})"
        rank = "full" if self.rank is None else f"r={self.rank}"
        return f"{self.expert} {rank} (a{self.active})"


def point_scores(records: Iterable[Result]) -> list[PointScores]:
    """Group the store's records by point and average each group's tasks; points keep first-seen order."""
    tasks: dict[PointKey, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    params: dict[PointKey, int | None] = {}
    for r in records:
        key = (r.mixture, r.expert, r.rank, r.active)
        tasks[key][r.group][r.task] = r.score
        if r.params is not None or key not in params:
            params[key] = r.params
    return [
        PointScores(
            mixture=key[0],
            expert=key[1],
            rank=key[2],
            active=key[3],
            groups=group_means(by_group),
            tasks={g: len(t) for g, t in by_group.items()},
            params=params.get(key),
        )
        for key, by_group in tasks.items()
    ]


def all_groups(points: Iterable[PointScores]) -> list[str]:
    """Every group seen, in first-seen order."""
    seen: dict[str, None] = {}
    for p in points:
        for g in p.groups:
            seen.setdefault(g, None)
    return list(seen)
