"""lm-eval integration: our model object through lm-eval's Hugging Face wrapper (`HFLM`), on local task
files (the embedded proxy) or lm-eval's own tasks (the paper's groups; online).

lm-eval is an optional extra: it is imported inside the functions, and a missing install is a clear error.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'flexmore[eval]'"
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TaskScore:
    task: str  # the leaf lm-eval task
    metric: str
    score: float
    n: int  # documents scored
    parent: str  # the requested task or lm-eval group it came from


def import_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as err:
        raise ImportError(f"benchmarks need lm-eval, an optional extra: {INSTALL_HINT} ({err})") from None
    return lm_eval


_TQDM_MODULES = ("lm_eval.api.model", "lm_eval.api.task", "lm_eval.models.huggingface")


def _bar_class(progress: Progress | None) -> type:
    """A silent stand-in for lm-eval's tqdm bars that reports the model-call bar to `progress` instead."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._label = str(kwargs.get("desc") or "")
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = 0
            self._of = int(kwargs.get("total") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if progress is not None and self._label.startswith("Running"):
                progress(self._done, self._of, self._label.removeprefix("Running ").lower())
            return None

    return Bar


@contextlib.contextmanager
def _quiet(progress: Progress | None = None) -> Iterator[None]:
    """lm-eval and datasets log every task build and draw their own bars: keep the console ours."""
    import importlib

    names = ("lm_eval", "lm-eval", "datasets", "transformers")
    levels = {n: logging.getLogger(n).level for n in names}
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    patched = []
    bar = _bar_class(progress)
    for module_name in _TQDM_MODULES:
        module = importlib.import_module(module_name)
        if hasattr(module, "tqdm"):
            patched.append((module, getattr(module, "tqdm")))  # noqa: B009 - mypy cannot see it
            setattr(module, "tqdm", bar)  # noqa: B010
    try:
        yield
    finally:
        for module, original in patched:
            setattr(module, "tqdm", original)  # noqa: B010
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def task_manager(include: Sequence[Path] = (), defaults: bool = True) -> Any:
    """lm-eval's task index over our local task folders, plus its built-in tasks if `defaults` (indexing
    those takes seconds: embedded-only runs leave them out)."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include]
    with _quiet():
        return TaskManager(include_path=paths or None, include_defaults=defaults)


def check_tasks(manager: Any, names: Sequence[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task or group {unknown}; see `lm-eval ls tasks`, or give a local task folder with "
            "--include (YAML task configs)"
        )


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    manager: Any,
    *,
    metrics: Callable[[str], Sequence[str]],
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> list[TaskScore]:
    """Evaluate `model` (in memory) on lm-eval `tasks`; one TaskScore per leaf task. `metrics(parent)` is
    the metric preference of a requested task: the first one a leaf reports is its score."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    check_tasks(manager, tasks)
    was_training = model.training
    model.eval()
    try:
        with _quiet(progress):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                bootstrap_iters=0,  # no stderr: seconds per point matter in a sweep
                log_samples=False,
                verbosity="ERROR",
            )
    finally:
        model.train(was_training)
    return parse_results(out, tasks, metrics)


def parse_results(
    out: dict[str, Any], tasks: Sequence[str], metrics: Callable[[str], Sequence[str]]
) -> list[TaskScore]:
    """Leaf-task scores from `simple_evaluate`'s output, each attributed to the requested task it belongs to."""
    results: dict[str, dict[str, Any]] = out["results"]
    subtasks: dict[str, list[str]] = out.get("group_subtasks", {})
    n_samples: dict[str, dict[str, int]] = out.get("n-samples", {})

    def leaves(name: str) -> list[str]:
        children = subtasks.get(name)
        if not children:
            return [name]
        return [leaf for child in children for leaf in leaves(child)]

    scores: list[TaskScore] = []
    for parent in tasks:
        for leaf in leaves(parent):
            row = results.get(leaf)
            if row is None:
                raise ValueError(f"lm-eval returned no results for task {leaf!r} (of {parent!r})")
            metric, value = _pick(row, metrics(parent), leaf)
            n = int(n_samples.get(leaf, {}).get("effective", row.get("sample_len", 0)) or 0)
            scores.append(TaskScore(task=leaf, metric=metric, score=value, n=n, parent=parent))
    return scores


def _pick(row: dict[str, Any], preference: Sequence[str], task: str) -> tuple[str, float]:
    for metric in preference:
        for key, value in row.items():
            name, _, _filter = key.partition(",")
            if name == metric and isinstance(value, int | float) and math.isfinite(value):
                return metric, float(value)
    reported = sorted({k.partition(",")[0] for k in row if "," in k and "stderr" not in k})
    raise ValueError(f"task {task!r} reports none of the metrics {list(preference)} (it reports {reported})")
