"""Report tables: built once as plain rows, written as CSV and Markdown, printed with rich by the CLI.

Tables (paper layout): mixtures (Table 2), experts vs their full-size baseline (Table 1), rank
sensitivity per curve (Tables 6-8), slope summary per family (Table 5), peak ranks per expert and
group, and median/IQR of log2 r* per group (Table 9).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flexmore.analysis.scores import AVG, PointScores, all_groups, average, delta_pct
from flexmore.analysis.sensitivity import SensitivityRow, peak_summary, sensitivity, slope_summary
from flexmore.storage import atomic_write_text

Cell = str | int | float | None
BASELINE = "flexolmo"


@dataclass(frozen=True)
class Table:
    name: str  # file stem
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def formatted(self) -> list[list[str]]:
        """Rows as text: 4 places for scores, +2 for Delta%, 33.27B / 742.4M for parameter counts."""
        return [
            [
                f"{c:+.2f}" if col == "delta_pct" and isinstance(c, float) else fmt(c)
                for col, c in zip(self.columns, row, strict=True)
            ]
            for row in self.rows
        ]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        w.writerows(["" if c is None else c for c in row] for row in self.rows)
        return buf.getvalue()

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.formatted()]
        lines += ["", *(f"- {n}" for n in self.notes)] if self.notes else []
        return "\n".join(lines) + "\n"


def fmt(c: Cell) -> str:
    if c is None:
        return "-"
    if isinstance(c, bool):
        return str(c)
    if isinstance(c, int):
        if abs(c) >= 10**9:
            return f"{c / 1e9:.2f}B"
        return f"{c / 1e6:.1f}M" if abs(c) >= 10**6 else str(c)
    if isinstance(c, float):
        return f"{c:.4f}"
    return c


def rank_label(rank: int | None) -> str:
    return "full" if rank is None else str(rank)


def mixtures_table(points: Sequence[PointScores], baseline: str = BASELINE) -> Table:
    """Paper Table 2: every multi-expert mixture, Delta% against `baseline` at the same active count."""
    mixtures = [p for p in points if not p.is_sweep]
    groups = all_groups(mixtures)
    base = {p.active: p for p in mixtures if p.mixture == baseline}
    table = Table("mixtures", "Mixtures", ["mixture", "active", "params", *groups, AVG, "delta_pct"])
    for p in sorted(mixtures, key=lambda p: (p.active, p.mixture != baseline)):
        avg = _avg(p, groups)
        b = base.get(p.active)
        b_avg = _avg(b, groups) if b is not None and b is not p else None
        delta = delta_pct(avg, b_avg) if avg is not None and b_avg is not None else None
        table.rows.append([p.mixture, p.active, p.params, *(p.groups.get(g) for g in groups), avg, delta])
    if mixtures and not base:
        table.notes.append(f"no {baseline!r} mixture measured: no Delta%")
    return table


def experts_table(points: Sequence[PointScores]) -> Table:
    """Paper Table 1: per expert and active count, the full-size baseline and the best rank by Avg."""
    sweep = [p for p in points if p.is_sweep]
    groups = all_groups(sweep)
    table = Table("experts", "Experts: best rank by Avg vs full-size", ["expert", "active", "rank", "params"])
    table.columns.extend([*groups, AVG, "delta_pct"])
    by: dict[tuple[str, int], list[PointScores]] = {}
    for p in sweep:
        by.setdefault((p.expert or "", p.active), []).append(p)
    for (expert, active), ps in by.items():
        full = next((p for p in ps if p.rank is None), None)
        ranked = [(a, p) for p in ps if p.rank is not None and (a := _avg(p, groups)) is not None]
        best = max(ranked, key=lambda ap: (ap[0], -(ap[1].rank or 0)))[1] if ranked else None
        base_avg = _avg(full, groups) if full is not None else None
        for q in (full, best):
            if q is None:
                continue
            avg = _avg(q, groups)
            delta = delta_pct(avg, base_avg) if q is best and avg is not None and base_avg is not None else None
            row: list[Cell] = [expert, active, rank_label(q.rank), q.params, *(q.groups.get(g) for g in groups)]
            table.rows.append([*row, avg, delta])
    return table


def sensitivity_table(rows: Sequence[SensitivityRow]) -> Table:
    """Paper Tables 6-8: per family and group, alpha, beta (slope per log2 rank), Pearson r, n."""
    table = Table(
        "sensitivity",
        "Rank sensitivity: s(r) = alpha + beta log2 r",
        ["family", "active", "group", "alpha", "beta", "pearson_r", "n", "peak_rank", "note"],
    )
    for r in rows:
        f = r.fit
        label = f"{r.family} a{r.active}" if r.kind == "homogeneous" else r.family
        table.rows.append(
            [
                label,
                r.active,
                r.group,
                f.alpha if f else None,
                f.beta if f else None,
                f.pearson if f else None,
                r.n,
                r.peak,
                r.note,
            ]
        )
    return table


def slopes_table(rows: Sequence[SensitivityRow]) -> Table:
    table = Table("slopes", "Median rank sensitivity over groups", ["family", "active", "median", "min", "max", "n"])
    for s in slope_summary(rows):
        label = f"{s.family} a{s.active}" if s.kind == "homogeneous" else s.family
        table.rows.append([label, s.active, s.median, s.min, s.max, s.n_groups])
    return table


def peaks_tables(rows: Sequence[SensitivityRow]) -> tuple[Table, Table]:
    """Peak rank r* per expert and group (lowest rank on ties), and median/IQR of log2 r* per group."""
    summaries = peak_summary(rows)
    experts = list(dict.fromkeys(e for s in summaries for e in s.peaks))
    per = Table("peak_ranks", "Peak rank r* per expert and group", ["group", "active", *experts])
    typical = Table(
        "peak_summary",
        "Typical log2 peak rank across experts (median, IQR; numpy linear quartiles)",
        ["group", "active", "median", "q25", "q75", "n"],
    )
    for s in summaries:
        per.rows.append([s.group, s.active, *(s.peaks.get(e) for e in experts)])
        typical.rows.append([s.group, s.active, s.log2.median, s.log2.q25, s.log2.q75, s.log2.n])
    return per, typical


def build_tables(points: Sequence[PointScores], baseline: str = BASELINE) -> list[Table]:
    """Every report table (Delta% of mixtures against `baseline`); empty ones are kept out."""
    if not points:
        raise ValueError("no results: the results store is empty")
    rows = sensitivity(points)
    tables = [mixtures_table(points, baseline), experts_table(points), sensitivity_table(rows), slopes_table(rows)]
    tables.extend(peaks_tables(rows))
    return [t for t in tables if t.rows]


def write_tables(tables: Iterable[Table], out_dir: str | Path) -> list[Path]:
    """`<name>.csv` per table and one `report.md` with all of them; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    markdown = ["# flexmore analysis", ""]
    for t in tables:
        atomic_write_text(out / f"{t.name}.csv", t.to_csv())
        written.append(out / f"{t.name}.csv")
        markdown.append(t.to_markdown())
    atomic_write_text(out / "report.md", "\n".join(markdown))
    return [*written, out / "report.md"]


def write_report_tables(points: Sequence[PointScores], out_dir: str | Path, baseline: str = BASELINE) -> list[Table]:
    """Build every table from the scored points and write CSV + Markdown under `out_dir`."""
    tables = build_tables(points, baseline)
    write_tables(tables, out_dir)
    return tables


def _avg(p: PointScores | None, groups: Sequence[str]) -> float | None:
    """Avg over `groups`, or None when the point lacks one of them (not comparable)."""
    if p is None or not set(groups) <= set(p.groups):
        return None
    return average(p.groups, groups)
