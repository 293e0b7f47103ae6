"""The paper's study, end to end on the embedded default (`flexmore demo`).

    public/        pretrain the tiny public model on the general mix
    federation/    train one full expert per domain on Flower's simulation engine (FlexOlmo recipe)
    experts/       every expert extracted once, at the largest useful rank (PHLoRA)
    results.jsonl  sweep: public + one expert at each rank and full-size; then every mixture at 2, 4, all active
    mixtures/      heterogeneous (proxy, budget and energy selection), homogeneous ranks, the FlexOlmo baseline
    analysis/      rank-sensitivity tables and plots
    report.md      paper Table 1 and 2 layouts, every number measured in this run

Each step skips what an earlier run already finished, so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from flexmore.storage import atomic_write_text
from flexmore.training.corpus import DOMAINS

Say = Callable[[str], None]
Update = Callable[[int, int, str], None]  # progress(done, total, label)
Bar = Callable[[str], AbstractContextManager[Update]]  # a progress bar per long step, e.g. cli.common.progress_bar


@contextlib.contextmanager
def no_bar(description: str) -> Iterator[Update]:
    yield lambda done, total, label: None


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    seed: int = 0
    pretrain_steps: int = 300
    expert_steps: int = 80
    client_cpus: int = 1  # Ray reserves this per simulated client: 2 train at once on 2 cores
    heldout_blocks: int = 64  # 256-token blocks of held-out text per domain behind each score
    eval_threads: int = 1  # tiny models: thread overhead exceeds the work (measured 3-6x slower at 2)

    def __post_init__(self) -> None:
        for name in ("pretrain_steps", "expert_steps", "heldout_blocks", "eval_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.client_cpus, bool) or not isinstance(self.client_cpus, int) or self.client_cpus < 1:
            raise ValueError(f"DemoConfig.client_cpus must be a positive int, got {self.client_cpus!r}")

    def settings(self) -> dict[str, Any]:
        """What the artefacts depend on (not where they are, nor threads): a rerun must match them."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "eval_threads")}

    @property
    def public(self) -> Path:
        return self.out / "public"

    @property
    def federation(self) -> Path:
        return self.out / "federation"

    @property
    def experts(self) -> Path:
        return self.out / "experts"


class _Clock:
    """Wall time per step, kept across reruns in OUT/timings.json (a resumed step adds its own time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            atomic_write_text(self.path, json.dumps(self.seconds, indent=2) + "\n")


def pretrain_public(config: DemoConfig, say: Say, bar: Bar = no_bar) -> Path:
    from flexmore.training.public import PretrainConfig, default_public_train, pretrain

    if (config.public / "config.json").is_file():
        say(f"public model: {config.public} (done earlier)")
        return config.public
    train = replace(default_public_train(), steps=config.pretrain_steps, seed=config.seed, checkpoint_every=100)
    with bar("pretrain") as update:
        result = pretrain(
            PretrainConfig(out=config.public, train=train),
            progress=lambda s: update(s.step, s.steps, f"loss {s.loss:.3f}  {s.tokens_per_s / 1e3:.1f}k tok/s"),
        )
    say(
        f"public model: {result.parameters:,} parameters, held-out loss {result.heldout_loss:.3f} nats "
        f"(unigram {result.unigram_loss:.3f}), {result.seconds:.0f}s"
    )
    return config.public


def federate_experts(config: DemoConfig, say: Say) -> dict[str, Path]:
    """One full expert per domain, each trained on its own SuperNode; returns name -> 2-expert checkpoint."""
    from flexmore.federated.config import FederateConfig, federated_train_default
    from flexmore.federated.runner import run_simulation

    report_path = config.federation / "federation.json"
    report: dict[str, Any] | None = json.loads(report_path.read_text()) if report_path.is_file() else None
    if report is None or set(report["experts"]) != set(DOMAINS):
        fed = FederateConfig(
            public=str(config.public.resolve()),
            out=config.federation,
            node_data={i: f"embedded:{d}" for i, d in enumerate(DOMAINS)},
            train=replace(federated_train_default(), steps=config.expert_steps, seed=config.seed),
        )
        result = run_simulation(fed, len(DOMAINS), echo=lambda line: None, client_cpus=config.client_cpus)
        report = result.report
        for node in report["nodes"]:
            m = node.get("metrics") or {}
            if node["status"] == "received":
                say(
                    f"  {node['name']}: held-out loss {m.get('loss-before', float('nan')):.3f} -> "
                    f"{m.get('loss-after', float('nan')):.3f}, {node['bytes_received']:,} bytes"
                )
        missing = sorted(set(DOMAINS) - set(report["experts"]))
        if missing:
            raise RuntimeError(f"the federation did not return experts {missing}: {report['failed']}")
    else:
        say(f"experts: {config.federation} (done earlier)")
    return {name: Path(e["path"]) for name, e in report["experts"].items()}


ACTIVE = (2, 4, len(DOMAINS) + 1)  # the paper's a2, a4 and a7 (all experts) at our size
SWEEP_ACTIVE = 2  # each expert is evaluated as a 2-expert model, both active, as FlexOlmo does
BASELINE = "flexolmo"
HOMO_BUDGET_RANK = 8  # the budget strategy gets the parameters of the homogeneous rank-8 mixture


def eval_config(config: DemoConfig) -> Any:
    """The embedded proxy: next-token accuracy on each domain's held-out documents (the ones the experts'
    training split left out: same seed). At this model size the 4-choice tasks of `flexmore eval --tasks
    embedded` sit near chance and move by less than their noise; 16k held-out tokens per domain do not."""
    from flexmore.evaluation.embedded import EmbeddedConfig
    from flexmore.evaluation.runner import EvalConfig

    return EvalConfig(
        tasks=(), heldout=True, heldout_blocks=config.heldout_blocks, embedded=EmbeddedConfig(seed=config.seed)
    )


def scored(config: DemoConfig) -> list[Any]:
    """The store's held-out results with each domain as its own group (score: token accuracy)."""
    from flexmore.evaluation.groups import HELDOUT_GROUP
    from flexmore.evaluation.store import ResultStore

    records = ResultStore(config.out / "results.jsonl").records()
    return [replace(r, group=r.task.removeprefix("heldout_")) for r in records if r.group == HELDOUT_GROUP]


def sweep_experts(config: DemoConfig, full: dict[str, Path], say: Say, bar: Bar = no_bar) -> dict[str, Path]:
    """Every expert extracted once (into OUT/experts/), then public + expert at each rank and full-size,
    evaluated; returns name -> low-rank expert folder."""
    from flexmore.evaluation.sweep import sweep

    store = config.out / "results.jsonl"
    experts = {name: f"{path}#1" for name, path in sorted(full.items())}  # expert 1 of [public, name]
    with bar("sweep") as update:
        report = sweep(
            config.public, experts, store, eval_config(config), active=SWEEP_ACTIVE, work=config.out, progress=update
        )
    say(f"sweep: {len(report.evaluated)} points evaluated, {len(report.skipped)} already in {store}")
    return {name: config.experts / name for name in experts}


@dataclass(frozen=True)
class Recipe:
    name: str
    ranks: dict[str, int | None]  # expert -> rank; None: the full-size expert
    how: str  # one line for the report


def recipes(config: DemoConfig, folders: dict[str, Path]) -> list[Recipe]:
    """The mixtures of paper Table 2: FlexOlmo (all full), homogeneous ranks, and heterogeneous ranks
    chosen three ways (paper: best proxy score per expert; a parameter budget; data-free spectrum)."""
    from flexmore.analysis.scores import point_scores
    from flexmore.evaluation.sweep import power_of_two_ranks
    from flexmore.lowrank.expert import ExpertMeta
    from flexmore.selection import cost_from_folders, select_ranks

    names = sorted(folders)
    points = point_scores(scored(config))
    max_rank = min(ExpertMeta.load(folders[n]).max_rank for n in names)
    out = [Recipe(BASELINE, dict.fromkeys(names), "all experts full-size (stock FlexOlmo)")]
    out += [
        Recipe(f"homo-{r}", dict.fromkeys(names, r), f"every expert at rank {r}") for r in power_of_two_ranks(max_rank)
    ]
    cost = cost_from_folders({n: str(f) for n, f in folders.items()})
    budget = sum(cost([HOMO_BUDGET_RANK] * len(names)))
    strategies = [
        ("hetero-avg", "proxy:avg", "per expert, the rank with the best Avg of its 2-expert sweep (paper)"),
        ("hetero-budget", f"budget:{budget}", f"best sum of Avg within the parameters of homo-{HOMO_BUDGET_RANK}"),
        ("hetero-energy", "energy:0.5:pooled", "smallest rank keeping half of each delta's energy (no data)"),
    ]
    for name, strategy, how in strategies:
        folders_arg = {n: str(f) for n, f in folders.items()}
        sel = select_ranks(strategy, points, folders=folders_arg, cost=cost, active=SWEEP_ACTIVE)
        out.append(Recipe(name, sel.ranks(), f"{how}: `{strategy}`"))
    return out


def compose_and_evaluate(
    config: DemoConfig, full: dict[str, Path], folders: dict[str, Path], plan: list[Recipe], bar: Bar = no_bar
) -> None:
    """Compose each mixture once (OUT/mixtures/NAME) and evaluate it at every active count not yet stored."""
    from flexmore.evaluation.store import ResultStore

    store = ResultStore(config.out / "results.jsonl")
    ec = eval_config(config)
    with bar("mixtures") as update:
        for i, recipe in enumerate(plan):
            update(i, len(plan), recipe.name)
            _compose_and_evaluate(config, recipe, full, folders, store, ec)
        update(len(plan), len(plan), "done")


def _compose_and_evaluate(
    config: DemoConfig, recipe: Recipe, full: dict[str, Path], folders: dict[str, Path], store: Any, ec: Any
) -> None:
    from flexmore.evaluation.runner import evaluate_mixture, load_mixture, pending
    from flexmore.mixture.compose import ComposeConfig, ExpertSpec, compose

    left = [a for a in ACTIVE if pending(ec.plan, store, (recipe.name, None, None, a), True)[1]]
    if not left:
        return
    folder = config.out / "mixtures" / recipe.name
    if not (folder / "config.json").is_file():
        specs = tuple(
            ExpertSpec(name=n, path=str(full[n]), index=1) if r is None else ExpertSpec(n, str(folders[n]), r)
            for n, r in sorted(recipe.ranks.items())
        )
        fmt = "flexolmo" if recipe.name == BASELINE else "flexmore"
        compose(ComposeConfig(public=str(config.public), experts=specs, out=folder, format=fmt))
    model, tokenizer = load_mixture(folder)
    for active in left:
        store.append(evaluate_mixture(model, tokenizer, ec, active=active, mixture=recipe.name))


def _noise(a: Any, b: Any, groups: list[str], n: int) -> float:
    """Two standard errors of Avg(a) - Avg(b): binomial per group score over n items, groups independent."""
    var = sum(p.groups[g] * (1 - p.groups[g]) / n for p in (a, b) for g in groups) / len(groups) ** 2
    return 2 * var**0.5


def _compare(label_a: str, a: float, label_b: str, b: float, noise: float) -> str:
    """'A 0.41 vs B 0.40: higher (+0.0100 > 2 SE 0.0048)', or 'within noise' below two standard errors."""
    d = a - b
    verdict = "within noise" if abs(d) < noise else ("higher" if d > 0 else "lower")
    sign = "<" if abs(d) < noise else ">"
    return f"{label_a} {a:.4f} vs {label_b} {b:.4f}: {verdict} ({d:+.4f}, |d| {sign} 2 SE {noise:.4f})"


def findings(points: list[Any], plan: list[Recipe], n: int) -> dict[str, list[str]]:
    """The paper's qualitative claims, checked on this run's numbers (whichever way they come out); a
    difference counts only beyond two binomial standard errors for `n` tokens (or items) per domain."""
    from flexmore.analysis.scores import all_groups

    out: dict[str, list[str]] = {
        "Low-rank experts match or beat full-size ones (2-expert sweep, Avg over all domains and own domain)": [],
        "Heterogeneous ranks beat homogeneous ranks at equal or fewer parameters": [],
        "FlexMoRE matches FlexOlmo (all experts full-size) with fewer parameters": [],
    }
    low, het_homo, het_base = out.values()
    sweep = [p for p in points if p.is_sweep and p.active == SWEEP_ACTIVE]
    groups = all_groups(sweep)
    for expert in sorted({p.expert for p in sweep if p.expert is not None}):
        own = [p for p in sweep if p.expert == expert]
        full = next((p for p in own if p.rank is None), None)
        ranked = [p for p in own if p.rank is not None and set(groups) <= set(p.groups)]
        if full is None or not ranked:
            continue
        best = max(ranked, key=lambda p: (p.avg(groups), -(p.rank or 0)))
        noise = _noise(best, full, groups, n)
        low.append(f"{expert}, Avg: " + _compare(f"r={best.rank}", best.avg(groups), "full", full.avg(groups), noise))
        if expert in full.groups:
            mine = max(ranked, key=lambda p: (p.groups.get(expert, 0.0), -(p.rank or 0)))
            noise = _noise(mine, full, [expert], n)
            low.append(
                f"{expert}, own domain: "
                + _compare(f"r={mine.rank}", mine.groups[expert], "full", full.groups[expert], noise)
            )
    mixtures = {(p.mixture, p.active): p for p in points if not p.is_sweep}
    mgroups = all_groups(mixtures.values())
    homo = [r.name for r in plan if r.name.startswith("homo-")]
    for recipe in (r for r in plan if r.name.startswith("hetero-")):
        for active in ACTIVE:
            het = mixtures.get((recipe.name, active))
            if het is None or het.params is None:
                continue
            label = f"{recipe.name} ({het.params / 1e6:.2f}M)"
            base = mixtures.get((BASELINE, active))
            if base is not None and base.params is not None:
                noise = _noise(het, base, mgroups, n)
                peer_label = f"{BASELINE} ({base.params / 1e6:.2f}M)"
                het_base.append(
                    f"a{active}: " + _compare(label, het.avg(mgroups), peer_label, base.avg(mgroups), noise)
                )
            # The cheapest homogeneous mixture with at least the heterogeneous one's parameters.
            peers = [mixtures[(h, active)] for h in homo if (h, active) in mixtures]
            peers = sorted((p for p in peers if (p.params or 0) >= het.params), key=lambda p: p.params or 0)
            if peers:
                peer = peers[0]
                noise = _noise(het, peer, mgroups, n)
                peer_label = f"{peer.mixture} ({(peer.params or 0) / 1e6:.2f}M)"
                het_homo.append(
                    f"a{active}: " + _compare(label, het.avg(mgroups), peer_label, peer.avg(mgroups), noise)
                )
    return out


def loss_table(records: list[Any]) -> list[str]:
    """Held-out loss (nats) of every mixture: the quantity the experts were trained on."""
    loss: dict[tuple[str, int], dict[str, float]] = {}
    for r in records:
        if r.expert is None and "loss" in r.extra:
            loss.setdefault((r.mixture, r.active), {})[r.group] = r.extra["loss"]
    if not loss:
        return []
    domains = sorted({d for by in loss.values() for d in by})
    md = ["## Held-out loss of the mixtures (nats, lower is better)", ""]
    md += ["| mixture | active | " + " | ".join(domains) + " | mean |", "|---" * (len(domains) + 3) + "|"]
    for (mixture, active), by in sorted(loss.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = " | ".join(f"{by[d]:.4f}" if d in by else "-" for d in domains)
        md.append(f"| {mixture} | {active} | {cells} | {sum(by.values()) / len(by):.4f} |")
    return [*md, ""]


def write_report(config: DemoConfig, plan: list[Recipe], seconds: dict[str, float]) -> Path:
    """OUT/report.md: every table from this run's results store, the plots, and the checked claims."""
    from flexmore.analysis.plots import plot_all
    from flexmore.analysis.scores import point_scores
    from flexmore.analysis.tables import write_report_tables
    from flexmore.training.loop import RESULT_FILE

    records = scored(config)
    points = point_scores(records)
    tokens = min(x.n for x in records)
    analysis = config.out / "analysis"
    tables = write_report_tables(points, analysis, baseline=BASELINE)
    plots = plot_all(points, analysis, baseline=BASELINE)
    public = json.loads((config.public / RESULT_FILE).read_text())["result"]
    federation = json.loads((config.federation / "federation.json").read_text())
    md = [
        "# FlexMoRE study on the embedded default",
        "",
        "Every number below was measured by `flexmore demo` in this run (a rerun resumes and reuses them).",
        "Scores are next-token accuracy on each domain's held-out documents (never seen in training;",
        f"{tokens:,} tokens per domain); Avg is the unweighted mean of the four domains. A",
        "difference is called real below only when it exceeds two binomial standard errors.",
        "",
        "## Wall time",
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in seconds.items()),
        f"| **total** | **{sum(seconds.values()):.0f}** |",
        "",
        "## Public model",
        "",
        f"{public['parameters']:,} parameters; held-out loss {public['heldout_loss']:.3f} nats against "
        f"{public['unigram_loss']:.3f} for the unigram distribution.",
        "",
        "## Experts, trained federatedly (Flower simulation, one SuperNode per domain)",
        "",
        "| expert | held-out loss, public | public + expert | bytes received |",
        "|---|---|---|---|",
    ]
    for node in federation["nodes"]:
        m = node.get("metrics") or {}
        if node["status"] == "received":
            md.append(
                f"| {node['name']} | {m.get('loss-before', float('nan')):.3f} "
                f"| {m.get('loss-after', float('nan')):.3f} | {node['bytes_received']:,} |"
            )
    md += ["", "## Mixtures composed", "", "| mixture | ranks | how |", "|---|---|---|"]
    for r in plan:
        ranks = ", ".join(f"{n} {'full' if k is None else k}" for n, k in sorted(r.ranks.items()))
        md.append(f"| {r.name} | {ranks} | {r.how} |")
    md += ["", "## Findings (the paper's claims, checked on these numbers)", ""]
    for claim, lines in findings(points, plan, tokens).items():
        md += [f"**{claim}**", "", *(f"- {line}" for line in lines or ["not enough points to check"]), ""]
    md += [t.to_markdown() for t in tables]
    md += loss_table(records)
    md += ["## Plots", ""] + [f"![{p.stem}](analysis/{p.name})" for p in plots]
    path = config.out / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def run_demo(config: DemoConfig, say: Say, bar: Bar = no_bar) -> Path:
    """The whole study; returns OUT/report.md."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines only
    config.out.mkdir(parents=True, exist_ok=True)
    settings = config.out / "demo.json"
    if settings.is_file() and json.loads(settings.read_text()) != config.settings():
        raise ValueError(
            f"{config.out} holds a run with other settings ({settings.read_text().strip()}); "
            "resume it with those, or give another --out"
        )
    atomic_write_text(settings, json.dumps(config.settings(), sort_keys=True) + "\n")
    clock = _Clock(config.out / "timings.json")
    say("[1/6] pretrain the public model")
    clock.step("pretrain", lambda: pretrain_public(config, say, bar))
    say(f"[2/6] train one expert per domain on Flower's simulation engine (logs: {config.federation}/.flower/logs)")
    full: dict[str, Path] = clock.step("federate", lambda: federate_experts(config, say))
    threads = torch.get_num_threads()
    torch.set_num_threads(config.eval_threads)
    try:
        say("[3/6] extract every expert once; sweep public + expert at every rank")
        folders: dict[str, Path] = clock.step("extract + sweep", lambda: sweep_experts(config, full, say, bar))
        say("[4/6] select ranks (proxy Avg, parameter budget, spectrum energy)")
        plan: list[Recipe] = clock.step("select", lambda: recipes(config, folders))
        say(f"[5/6] compose {len(plan)} mixtures and evaluate each at {', '.join(map(str, ACTIVE))} active experts")
        clock.step("compose + evaluate", lambda: compose_and_evaluate(config, full, folders, plan, bar))
    finally:
        torch.set_num_threads(threads)
    say("[6/6] analysis, plots and report")
    return write_report(config, plan, clock.seconds)
