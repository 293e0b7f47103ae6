"""Evaluate one mixture: embedded proxy groups and/or paper groups through lm-eval, and held-out loss.

`evaluate_mixture` is the single entry point the CLI, the sweep and the demo call; it returns store
records (`Result`) for one point (mixture, expert, rank, active), one per leaf task.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from flexmore.analysis.scores import average, group_means
from flexmore.evaluation.embedded import EmbeddedConfig, task_folder
from flexmore.evaluation.groups import EMBEDDED_GROUPS, HELDOUT_GROUP, Group, TaskPlan, resolve_tasks
from flexmore.evaluation.store import Result, ResultStore
from flexmore.mixture.modeling import FlexMoReForCausalLM

Progress = Callable[[int, int, str], None]
PointKey = tuple[str, str | None, int | None, int]  # (mixture, expert, rank, active)


def default_cache() -> Path:
    """Where generated embedded task folders live: $FLEXMORE_CACHE or ~/.cache/flexmore, under tasks/."""
    root = os.environ.get("FLEXMORE_CACHE") or Path.home() / ".cache" / "flexmore"
    return Path(root) / "tasks"


@dataclass(frozen=True)
class EvalConfig:
    tasks: str | tuple[str, ...] = "embedded"  # see groups.resolve_tasks
    limit: int | None = 100  # items per task (lm-eval's --limit); None: all
    heldout: bool = False  # also held-out loss / ppl / token accuracy per embedded domain
    batch_size: int = 32
    cache: Path = field(default_factory=default_cache)  # generated embedded task folders
    include: tuple[Path, ...] = ()  # more local lm-eval task folders (YAML task configs)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    heldout_blocks: int | None = 64  # blocks of seq_len tokens per domain; None: all
    seq_len: int = 256
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"EvalConfig.limit must be a positive int or None, got {self.limit!r}")
        for name in ("batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be a positive int, got {value!r}")
        for folder in self.include:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--include {folder}: not a folder of lm-eval task YAMLs")
        if not self.tasks and not self.heldout:
            raise ValueError("nothing to evaluate: give tasks, or heldout=True (--heldout)")
        self.plan  # noqa: B018 - validates the task list now, not mid-sweep

    @property
    def plan(self) -> TaskPlan:
        return resolve_tasks(self.tasks) if self.tasks else TaskPlan(())  # () with heldout: held-out only


# ---------------------------------------------------------------- models


def load_mixture(folder: str | Path, tokenizer: str | Path | None = None) -> tuple[FlexMoReForCausalLM, Any]:
    """A FlexMoRE checkpoint, or a FlexOlmo one (converted, same weights, so top-k can be set), and its
    tokenizer (from `tokenizer`, default the checkpoint folder)."""
    from transformers import AutoTokenizer, FlexOlmoForCausalLM

    import flexmore.mixture  # noqa: F401 - registers model_type "flexmore"

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a FlexMoRE or FlexOlmo checkpoint folder)")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    model: FlexMoReForCausalLM
    if model_type == "flexmore":
        model = FlexMoReForCausalLM.from_pretrained(folder)
    elif model_type == "flex_olmo":
        model = FlexMoReForCausalLM.from_flexolmo(FlexOlmoForCausalLM.from_pretrained(folder))
    else:
        raise ValueError(
            f"{folder}: model_type is {model_type!r}; flexmore eval takes a FlexMoRE ('flexmore') or "
            "FlexOlmo ('flex_olmo') checkpoint"
        )
    source = Path(tokenizer) if tokenizer is not None else folder
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{source}: no tokenizer there ({err}); pass --tokenizer DIR") from None
    return model.eval(), tok


def set_active(model: nn.Module, active: int) -> None:
    """Route each token to `active` experts (top-k). FlexOlmo evaluates a 2-expert model with both active."""
    n = int(getattr(model.config, "num_experts", 1))
    if not 1 <= active <= n:
        raise ValueError(f"active experts must be in [1, {n}] (the mixture's experts), got {active}")
    set_top_k = getattr(model, "set_top_k", None)
    if set_top_k is None:
        raise ValueError(f"{type(model).__name__} cannot change its top-k; load it with load_mixture")
    set_top_k(active)


# ---------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=4)
def _manager(include: tuple[str, ...], defaults: bool) -> Any:
    # Indexing lm-eval's built-in tasks takes seconds: once per process and task folder set.
    from flexmore.evaluation.harness import task_manager

    return task_manager([Path(p) for p in include], defaults=defaults)


def pending(plan: TaskPlan, store: ResultStore | None, point: PointKey, heldout: bool) -> tuple[TaskPlan, bool]:
    """What of `plan` (and held-out) is not yet in the store for this point. A group counts as done when
    any of its results is stored: a point's results are appended together, in one write."""
    if store is None:
        return plan, heldout
    done = {r.group for r in store.records() if (r.mixture, r.expert, r.rank, r.active) == point}
    return TaskPlan(tuple(g for g in plan.groups if g.name not in done)), heldout and HELDOUT_GROUP not in done


def evaluate_mixture(
    model: nn.Module,
    tokenizer: Any,
    config: EvalConfig,
    *,
    active: int,
    mixture: str,
    expert: str | None = None,
    rank: int | None = None,
    plan: TaskPlan | None = None,
    heldout: bool | None = None,
    progress: Progress | None = None,
) -> list[Result]:
    """Evaluate `model` with `active` experts per token; one Result per leaf task (+ held-out per domain).
    `plan`/`heldout` override the config's (the sweep passes what is still pending)."""
    from flexmore.evaluation.harness import run_tasks

    plan = config.plan if plan is None else plan
    heldout = config.heldout if heldout is None else heldout
    set_active(model, active)
    params = sum(p.numel() for p in model.parameters())

    def result(task: str, group: str, metric: str, score: float, n: int, **extra: float) -> Result:
        return Result(mixture, expert, rank, active, task, group, metric, score, n, params, dict(extra))

    results: list[Result] = []
    include = [str(Path(p).resolve()) for p in config.include]
    if plan.embedded:
        include.append(str(task_folder(config.cache, config.embedded).resolve()))
    by_task: dict[str, Group] = {t: g for g in plan.groups for t in g.tasks}
    names = list(by_task)
    if names:
        # Local task folders alone index in milliseconds; lm-eval's own tasks only when a name needs them.
        manager = _manager(tuple(include), False)
        if not set(names) <= set(manager.all_tasks):
            manager = _manager(tuple(include), True)
        scores = run_tasks(
            model,
            tokenizer,
            names,
            manager,
            metrics=lambda parent: by_task[parent].metrics,
            limit=config.limit,
            batch_size=config.batch_size,
            progress=progress,
        )
        results.extend(result(s.task, by_task[s.parent].name, s.metric, s.score, s.n) for s in scores)
    if heldout:
        from flexmore.evaluation.heldout import heldout_scores

        for h in heldout_scores(
            model,
            tokenizer,
            list(EMBEDDED_GROUPS),
            config=config.embedded,
            seq_len=config.seq_len,
            batch_size=max(1, config.batch_size // 4),
            max_blocks=config.heldout_blocks,
            device=config.device,
            progress=progress,
        ):
            results.append(
                result(f"heldout_{h.domain}", HELDOUT_GROUP, "token_acc", h.token_acc, h.tokens, loss=h.loss, ppl=h.ppl)
            )
    return results


# ---------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Summary:
    groups: dict[str, float]  # group -> mean of its tasks' scores (the held-out group excluded)
    avg: float | None  # unweighted mean of the group means


def summarize(results: Sequence[Result]) -> Summary:
    """Group means and Avg of one point's results (analysis.scores does the arithmetic). Held-out token
    accuracy is reported apart: it is not a benchmark group of the paper's Avg."""
    by_group: dict[str, dict[str, float]] = {}
    for r in results:
        if r.group != HELDOUT_GROUP:
            by_group.setdefault(r.group, {})[r.task] = r.score
    means = group_means(by_group)
    return Summary(groups=means, avg=average(means) if means else None)
