"""Analysis plots (PNG, matplotlib Agg; no display): paper Figures 2, 3 and 4, and params vs score.

matplotlib is imported inside each function (it is an optional `eval` extra) and always with the
Agg backend, so the plots render on a headless machine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flexmore.analysis.scores import AVG, PointScores, all_groups, average
from flexmore.analysis.sensitivity import HOMOGENEOUS, Curve, curves, fit_log2, peak_summary, sensitivity
from flexmore.analysis.tables import BASELINE

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("plots need matplotlib: pip install 'flexmore[eval]'") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    _pyplot().close(fig)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def plot_sensitivity(points: Sequence[PointScores], path: Path) -> Path | None:
    """Figure 4: score vs log2 rank per expert, one panel per group (Avg last), with the fitted lines."""
    expert_curves = [c for c in curves(points) if c.kind == "expert"]
    if not expert_curves:
        return None
    plt = _pyplot()
    groups = list(dict.fromkeys(c.group for c in expert_curves))
    rows, cols = _grid(len(groups))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = _colors({c.family for c in expert_curves})
    multi_active = len({c.active for c in expert_curves}) > 1
    for ax, group in zip(axes.flat, groups, strict=False):
        for c in (c for c in expert_curves if c.group == group):
            label = f"{c.family} a{c.active}" if multi_active else c.family
            _curve(ax, c, colors[c.family], label)
        ax.set_title(group)
        ax.set_xlabel("log2 rank")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Score vs rank per expert (lines: least-squares fit in log2 rank)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def _curve(ax: Any, c: Curve, color: Any, label: str) -> None:
    x = np.log2(np.asarray(list(c.scores), dtype=float))
    y = np.asarray(list(c.scores.values()), dtype=float)
    ax.plot(x, y, "o", color=color, label=label, markersize=4)
    fit = fit_log2(list(c.scores), list(c.scores.values()))
    if fit is not None:
        xs = np.array([x.min(), x.max()])
        ax.plot(xs, fit.alpha + fit.beta * xs, "-", color=color, linewidth=1)


def plot_homogeneous(points: Sequence[PointScores], path: Path, baseline: str = BASELINE) -> Path | None:
    """Figure 2: mixture Avg vs homogeneous rank, one panel per active count, with every other mixture
    (heterogeneous, baseline) as a horizontal line."""
    mixtures = [p for p in points if not p.is_sweep]
    groups = all_groups(mixtures)
    homo: dict[int, dict[int, float]] = defaultdict(dict)
    others: dict[int, dict[str, float]] = defaultdict(dict)
    for p in mixtures:
        if not set(groups) <= set(p.groups):
            continue
        avg = average(p.groups, groups)
        m = HOMOGENEOUS.match(p.mixture)
        if m:
            homo[p.active][int(m["rank"])] = avg
        else:
            others[p.active][p.mixture] = avg
    actives = sorted(set(homo) | set(others))
    if not actives:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(actives), figsize=(4.5 * len(actives), 3.4), squeeze=False)
    names = sorted({n for o in others.values() for n in o})
    colors = _colors(set(names))
    for ax, a in zip(axes.flat, actives, strict=True):
        if homo[a]:
            ranks = sorted(homo[a])
            ax.plot(np.log2(ranks), [homo[a][r] for r in ranks], "o-", color="black", label="homogeneous")
        for name, avg in sorted(others[a].items()):
            style = ":" if name == baseline else "--"
            ax.axhline(avg, linestyle=style, color="grey" if name == baseline else colors[name], label=name)
        ax.set_title(f"{a} active")
        ax.set_xlabel("log2 rank (homogeneous)")
        ax.set_ylabel(f"{AVG} over {len(groups)} groups")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Mixture Avg vs rank")
    fig.tight_layout()
    return _save(fig, path)


def plot_peaks(points: Sequence[PointScores], path: Path) -> Path | None:
    """Figure 3: log2 peak rank of each expert per group, with the median and IQR."""
    summaries = peak_summary(sensitivity(points))
    if not summaries:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(summaries) + 2), 3.6))
    colors = _colors({e for s in summaries for e in s.peaks})
    multi_active = len({s.active for s in summaries}) > 1
    labels = [f"{s.group} a{s.active}" if multi_active else s.group for s in summaries]
    for i, s in enumerate(summaries):
        q = s.log2
        ax.plot([i, i], [q.q25, q.q75], color="black", linewidth=6, alpha=0.25, solid_capstyle="butt")
        ax.plot([i - 0.25, i + 0.25], [q.median, q.median], color="black", linewidth=2)
        for j, (expert, r) in enumerate(sorted(s.peaks.items())):
            offset = (j - (len(s.peaks) - 1) / 2) * 0.06
            ax.plot(i + offset, math.log2(r), "o", color=colors[expert], label=expert if i == 0 else None)
    ax.set_xticks(range(len(summaries)), labels, rotation=30, ha="right")
    ax.set_ylabel("log2 peak rank r*")
    ax.set_title("Typical peak rank (bar: IQR, line: median)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def plot_params_vs_score(points: Sequence[PointScores], path: Path) -> Path | None:
    """Total parameters vs Avg of every measured point that carries a parameter count."""
    measured = [p for p in points if p.params is not None]
    if not measured:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sweep, mixtures = [p for p in measured if p.is_sweep], [p for p in measured if not p.is_sweep]
    colors = _colors({p.expert or "" for p in sweep})
    for expert in sorted(colors):
        ps = sorted((p for p in sweep if p.expert == expert), key=lambda p: p.params or 0)
        ax.plot([p.params for p in ps], [p.avg() for p in ps], "o-", color=colors[expert], label=expert, alpha=0.7)
    homo: dict[int, list[PointScores]] = defaultdict(list)
    for p in mixtures:
        if HOMOGENEOUS.match(p.mixture):
            homo[p.active].append(p)
            continue
        ax.plot(p.params, p.avg(), "s", color="black")
        label = f"{p.mixture} a{p.active}"
        ax.annotate(label, (p.params, p.avg()), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for a, ps in sorted(homo.items()):
        ps.sort(key=lambda p: p.params or 0)
        ax.plot([p.params for p in ps], [p.avg() for p in ps], "^--", markersize=4, label=f"homogeneous a{a}")
    ax.set_xscale("log")
    ax.set_xlabel("total parameters")
    ax.set_ylabel(AVG)
    ax.set_title("Parameters vs score (circles: expert sweeps, triangles: homogeneous, squares: mixtures)")
    ax.grid(alpha=0.3)
    if sweep or homo:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_all(points: Sequence[PointScores], out_dir: str | Path, baseline: str = BASELINE) -> list[Path]:
    """Every plot that the data supports, as PNGs under `out_dir`; returns the written paths."""
    out = Path(out_dir)
    made = [
        plot_sensitivity(points, out / "sensitivity.png"),
        plot_homogeneous(points, out / "mixtures_vs_rank.png", baseline),
        plot_peaks(points, out / "peak_ranks.png"),
        plot_params_vs_score(points, out / "params_vs_score.png"),
    ]
    return [p for p in made if p is not None]


def _colors(names: set[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(sorted(names))}
