"""Rank selection: which rank each expert gets in a heterogeneous mixture (paper section 4.2).

Every strategy is a small function behind one interface, `select_ranks(strategy, ...)`:

- `proxy:GROUP` / `proxy:avg` (the paper's): per expert, the measured rank with the best score in the
  proxy group (or Avg), ties to the lowest rank. Full-size points only compete with `include_full`.
- `budget:PARAMS[:GROUP]`: per expert exactly one measured choice (a rank, or full when measured),
  maximising the sum of the per-expert proxy scores (default Avg) with the total extra parameters
  <= PARAMS. Exact: Pareto fronts (cost, score) per expert merged one expert at a time, so a budget of
  billions costs no more than one of thousands. Ties: the lower total cost, then the lower ranks.
- `energy:FRACTION[:pooled]` (data-free): from each expert folder's expert.json, the smallest recorded
  rank (powers of two and max_rank) at which *every* matrix keeps >= FRACTION of its ||delta||_F^2
  (the worst matrix decides); with `:pooled`, at which the expert as a whole (all matrices'
  energy summed, i.e. weighted by ||delta_m||_F^2) keeps >= FRACTION.

A rank of None means the full-size expert.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flexmore.analysis.scores import AVG, PointScores, all_groups

CostFn = Callable[[Sequence[int | None]], list[int]]  # ranks -> extra parameters of one expert at each


class SelectionError(ValueError):
    """A strategy that cannot be applied to these inputs; the message says why."""


@dataclass(frozen=True)
class Choice:
    expert: str
    rank: int | None  # None: the full-size expert
    params: int | None  # extra parameters of this expert at this rank (None: unknown)
    score: float | None  # the proxy score (or kept energy fraction) behind the choice


@dataclass(frozen=True)
class Selection:
    strategy: str
    choices: list[Choice]
    budget: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int | None:
        costs = [c.params for c in self.choices]
        return None if any(p is None for p in costs) else sum(p for p in costs if p is not None)

    def ranks(self) -> dict[str, int | None]:
        return {c.expert: c.rank for c in self.choices}

    def compose_args(self, folders: Mapping[str, str]) -> list[str]:
        """`--expert NAME=DIR@RANK` per expert whose folder is known; a full-size choice needs its
        folder given as NAME=CHECKPOINT#INDEX (a FlexOlmo checkpoint), else it is left out."""
        args = []
        for c in self.choices:
            spec = _compose_spec(folders.get(c.expert), c.rank)
            if spec is not None:
                args += ["--expert", f"{c.expert}={spec}"]
        return args

    def to_dict(self, folders: Mapping[str, str] | None = None) -> dict[str, Any]:
        folders = folders or {}
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "total_params": self.total_params,
            "experts": [{**asdict(c), "path": folders.get(c.expert)} for c in self.choices],
            "compose_args": self.compose_args(folders),
            "notes": self.notes,
        }

    def write(self, path: str | Path, folders: Mapping[str, str] | None = None) -> None:
        from flexmore.storage import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(folders), indent=2) + "\n")


def _compose_spec(path: str | None, rank: int | None) -> str | None:
    if path is None:
        return None
    if rank is None:
        return path if "#" in path else None
    return f"{path.split('#')[0]}@{rank}"


# -- strategy parsing -------------------------------------------------------------------------------

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str) -> int:
    """`750M`, `2.5B`, `1e9`, `1_000_000` -> an integer parameter count."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    scale = 1
    if t and t[-1] in _SUFFIX:
        t, scale = t[:-1], _SUFFIX[t[-1]]
    try:
        value = float(t) * scale
    except ValueError:
        raise SelectionError(f"budget {text!r}: expected a parameter count like 750M, 2.5B or 1e9") from None
    if not math.isfinite(value) or value < 0:
        raise SelectionError(f"budget {text!r}: must be a non-negative parameter count")
    return int(value)


@dataclass(frozen=True)
class Strategy:
    kind: str  # "proxy" | "budget" | "energy"
    group: str = AVG  # proxy group (proxy, budget)
    budget: int | None = None
    fraction: float | None = None
    pooled: bool = False

    @classmethod
    def parse(cls, text: str) -> Strategy:
        kind, _, rest = text.strip().partition(":")
        parts = rest.split(":") if rest else []
        if kind == "proxy" and len(parts) == 1 and parts[0]:
            return cls("proxy", group=_group(parts[0]))
        if kind == "budget" and len(parts) in (1, 2):
            return cls("budget", budget=parse_count(parts[0]), group=_group(parts[1]) if len(parts) == 2 else AVG)
        if kind == "energy" and len(parts) in (1, 2):
            try:
                fraction = float(parts[0])
            except ValueError:
                fraction = -1.0
            if not 0 < fraction <= 1:
                raise SelectionError(f"strategy {text!r}: the energy fraction must be in (0, 1], got {parts[0]!r}")
            if len(parts) == 2 and parts[1] != "pooled":
                raise SelectionError(f"strategy {text!r}: the only energy mode is ':pooled', got {parts[1]!r}")
            return cls("energy", fraction=fraction, pooled=len(parts) == 2)
        raise SelectionError(
            f"unknown strategy {text!r}; expected proxy:GROUP (e.g. proxy:MC9), proxy:avg, "
            "budget:PARAMS[:GROUP] (e.g. budget:2B) or energy:FRACTION[:pooled] (e.g. energy:0.9)"
        )

    def __str__(self) -> str:
        if self.kind == "proxy":
            return f"proxy:{self.group}"
        if self.kind == "budget":
            return f"budget:{self.budget}:{self.group}"
        return f"energy:{self.fraction}" + (":pooled" if self.pooled else "")


def _group(text: str) -> str:
    return AVG if text.lower() in ("avg", "average", "all") else text


# -- measured points per expert ---------------------------------------------------------------------


def sweep_scores(
    points: Iterable[PointScores], group: str = AVG, active: int | None = None
) -> dict[str, dict[int | None, float]]:
    """{expert: {rank: proxy score}} from the sweep points (one public + one expert) at one active count.
    Avg is taken over every group the sweep measured; a point missing one of them is left out."""
    sweep = [p for p in points if p.is_sweep]
    if not sweep:
        raise SelectionError("no sweep points (one public + one expert at a rank) in the results")
    actives = sorted({p.active for p in sweep})
    if active is None:
        if len(actives) > 1:
            raise SelectionError(f"the sweep was measured at several active counts {actives}; choose one")
        active = actives[0]
    elif active not in actives:
        raise SelectionError(f"no sweep points at {active} active; measured at {actives}")
    sweep = [p for p in sweep if p.active == active]
    groups = all_groups(sweep)
    if group != AVG and group not in groups:
        raise SelectionError(f"proxy group {group!r} was not measured; groups are {groups}")
    out: dict[str, dict[int | None, float]] = {}
    for p in sweep:
        if group == AVG and set(groups) <= set(p.groups):
            out.setdefault(p.expert or "", {})[p.rank] = p.avg(groups)
        elif group in p.groups:
            out.setdefault(p.expert or "", {})[p.rank] = p.groups[group]
    return out


def _order(rank: int | None) -> float:
    return math.inf if rank is None else rank


# -- strategies -------------------------------------------------------------------------------------


def select_proxy(scores: Mapping[str, Mapping[int | None, float]], include_full: bool = False) -> dict[str, int | None]:
    """The paper's: per expert, the rank with the best proxy score, the lowest rank on ties."""
    chosen: dict[str, int | None] = {}
    for expert, by_rank in scores.items():
        options = {r: s for r, s in by_rank.items() if include_full or r is not None}
        if not options:
            raise SelectionError(f"expert {expert!r}: no measured rank (only a full-size point)")
        best = max(options.values())
        chosen[expert] = min((r for r, s in options.items() if s == best), key=_order)
    return chosen


@dataclass(frozen=True)
class _Option:
    cost: int
    score: float
    ranks: tuple[int | None, ...]

    def key(self) -> tuple[int, float, tuple[float, ...]]:
        return (self.cost, -self.score, tuple(_order(r) for r in self.ranks))


def select_budget(
    scores: Mapping[str, Mapping[int | None, float]], costs: Mapping[str, Mapping[int | None, int]], budget: int
) -> dict[str, int | None]:
    """Exact multiple-choice knapsack: one measured choice per expert, maximum summed score, total cost
    <= budget. Each step keeps only the Pareto front (no option both cheaper-or-equal and better)."""
    experts = list(scores)
    front = [_Option(0, 0.0, ())]
    cheapest = 0
    for e in experts:
        options = [(r, s, costs[e][r]) for r, s in scores[e].items()]
        if not options:
            raise SelectionError(f"expert {e!r}: no measured rank")
        cheapest += min(c for _, _, c in options)
        merged = [
            _Option(o.cost + c, o.score + s, (*o.ranks, r))
            for o in front
            for r, s, c in options
            if o.cost + c <= budget
        ]
        front = []
        for o in sorted(merged, key=_Option.key):
            if not front or o.score > front[-1].score:
                front.append(o)
        if not front:
            break
    if not front:
        raise SelectionError(
            f"budget {budget:,} parameters is too small: the cheapest measured choice for every expert "
            f"together costs {cheapest:,}"
        )
    best = max(front, key=lambda o: o.score)  # the front is cost-ascending: the first max is the cheapest
    return dict(zip(experts, best.ranks, strict=True))


def energy_profile(folder: str | Path) -> tuple[str, dict[int, float], dict[int, float]]:
    """(name, {rank: worst matrix's kept fraction}, {rank: pooled kept fraction}) from expert.json."""
    from flexmore.lowrank.expert import ExpertMeta

    meta = ExpertMeta.load(Path(folder))
    if not meta.matrices:
        raise SelectionError(f"{folder}: expert.json records no per-matrix energy; re-extract it")
    ranks = sorted({int(k) for m in meta.matrices.values() for k in m.get("energy", {})})
    worst: dict[int, float] = {}
    pooled: dict[int, float] = {}
    total = math.fsum(m.get("frobenius", 0.0) ** 2 for m in meta.matrices.values())
    for k in ranks:
        kept = [(m["energy"].get(str(k)), m.get("frobenius", 0.0) ** 2) for m in meta.matrices.values()]
        if any(f is None for f, _ in kept):
            continue  # not recorded for every matrix
        worst[k] = min(float(f) for f, _ in kept if f is not None)
        pooled[k] = math.fsum(float(f) * w for f, w in kept if f is not None) / total if total > 0 else 1.0
    return meta.name, worst, pooled


def select_energy(profiles: Mapping[str, Mapping[int, float]], fraction: float) -> dict[str, int | None]:
    """Smallest recorded rank whose kept energy fraction is >= `fraction`, per expert."""
    chosen: dict[str, int | None] = {}
    for expert, kept in profiles.items():
        ok = [k for k, f in sorted(kept.items()) if f >= fraction]
        if not ok:
            top = max(kept) if kept else 0
            raise SelectionError(
                f"expert {expert!r}: no recorded rank keeps {fraction} of the energy (rank {top} keeps "
                f"{kept.get(top, 0.0):.4f}); extract at a higher rank or lower the fraction"
            )
        chosen[expert] = ok[0]
    return chosen


def select_ranks(
    strategy: str | Strategy,
    points: Sequence[PointScores] = (),
    *,
    folders: Mapping[str, str | Path] | None = None,
    cost: CostFn | None = None,
    active: int | None = None,
    include_full: bool | None = None,
) -> Selection:
    """Apply one strategy. `points`: scored results (proxy, budget); `folders`: expert name -> expert
    folder (energy; also names the experts to keep); `cost`: ranks -> extra parameters of one expert
    (required by budget; without it, the choices carry no parameter count). `include_full`: whether a
    measured full-size point competes (default: no for proxy, as in the paper; yes for budget)."""
    s = strategy if isinstance(strategy, Strategy) else Strategy.parse(strategy)
    notes: list[str] = []
    scores: Mapping[str, Mapping[int | None, float]]
    if s.kind == "energy":
        if not folders:
            raise SelectionError("energy selection reads expert folders: give at least one --expert NAME=DIR")
        assert s.fraction is not None
        profiles = {}
        for name, folder in folders.items():
            _, worst, pooled = energy_profile(str(folder).split("#")[0])
            profiles[name] = pooled if s.pooled else worst
        ranks = select_energy(profiles, s.fraction)
        scores = {e: {r: profiles[e][r]} for e, r in ranks.items() if r is not None}
    else:
        if not points:
            raise SelectionError("no results: the results store is empty")
        scores = sweep_scores(points, s.group, active)
        if folders:
            unknown = sorted(set(folders) - set(scores))
            if unknown:
                raise SelectionError(f"experts {unknown} have no sweep points; measured: {sorted(scores)}")
            scores = {e: scores[e] for e in folders}
        if include_full is None:
            include_full = s.kind == "budget"
        if s.kind == "proxy":
            ranks = select_proxy(scores, include_full)
        else:
            if cost is None:
                raise SelectionError("budget selection needs parameter costs: give --config or --expert NAME=DIR")
            assert s.budget is not None
            options = {e: {r: v for r, v in by.items() if include_full or r is not None} for e, by in scores.items()}
            costs = {e: dict(zip(by, cost(list(by)), strict=True)) for e, by in options.items()}
            ranks = select_budget(options, costs, s.budget)
    per_rank: list[int | None] = list(cost(list(ranks.values()))) if cost is not None else [None] * len(ranks)
    choices = [Choice(e, r, p, scores[e].get(r)) for (e, r), p in zip(ranks.items(), per_rank, strict=True)]
    for c in choices:
        if c.rank is None and folders and _compose_spec(str(folders.get(c.expert, "")), None) is None:
            notes.append(f"{c.expert}: full-size chosen; compose it as {c.expert}=CHECKPOINT#INDEX")
    return Selection(str(s), choices, budget=s.budget, notes=notes)


def parse_folders(specs: Iterable[str]) -> dict[str, str]:
    """`NAME=DIR` (or NAME=DIR@RANK, NAME=CHECKPOINT#INDEX: the rank is ignored) -> {name: path}."""
    out: dict[str, str] = {}
    for text in specs:
        m = re.match(r"^(?P<name>[A-Za-z0-9_.\-]+)=(?P<path>.+?)(?:@\d+)?$", text.strip())
        if m is None:
            raise SelectionError(f"--expert {text!r}: expected NAME=DIR")
        if m["name"] in out:
            raise SelectionError(f"--expert {m['name']!r} given twice")
        out[m["name"]] = m["path"]
    return out


def cost_from_config(base: Mapping[str, Any]) -> CostFn:
    """Extra parameters per rank from a FlexOlmo config dict (counted on the meta device, cached)."""
    from flexmore.analysis.params import expert_params

    cache: dict[int | None, int] = {}

    def cost(ranks: Sequence[int | None]) -> list[int]:
        missing = sorted({r for r in ranks if r not in cache}, key=_order)
        if missing:
            try:
                cache.update(zip(missing, expert_params(dict(base), missing), strict=True))
            except ValueError as err:
                raise SelectionError(f"parameter count: {err}") from err
        return [cache[r] for r in ranks]

    return cost


def cost_from_folders(folders: Mapping[str, str | Path]) -> CostFn:
    """Extra parameters per rank from the dimensions recorded in expert folders (which must agree)."""
    from flexmore.analysis.params import dims_config
    from flexmore.lowrank.expert import ExpertMeta

    dims = {}
    for name, folder in folders.items():
        if "#" in str(folder):
            continue  # a full expert in a checkpoint: no expert.json
        m = ExpertMeta.load(Path(folder))
        dims[name] = (m.hidden_size, m.intermediate_size, m.num_layers)
    if not dims:
        raise SelectionError("no expert folder to read dimensions from; give --config")
    if len(set(dims.values())) > 1:
        raise SelectionError(f"expert folders disagree on (hidden, intermediate, layers): {dims}")
    return cost_from_config(dims_config(*next(iter(dims.values()))))
