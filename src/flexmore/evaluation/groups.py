"""Which tasks make up each evaluation group, and how a `--tasks` list resolves to them.

Two families:
- the paper's groups (section 4.1), run through lm-eval's own task definitions: online runs only, since
  lm-eval downloads their datasets. Each entry names lm-eval tasks or lm-eval groups (expanded to their
  leaf tasks, each scored on its own, then averaged into our group mean as the paper does);
- the embedded proxy groups, one per embedded domain: a multiple-choice task generated from held-out
  documents (`evaluation.embedded`), run through the same lm-eval pipeline, offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexmore.training.corpus import DOMAINS

EMBEDDED_PREFIX = "flexmore_"  # embedded task names: flexmore_code, flexmore_math, ...
HELDOUT_GROUP = "heldout"  # held-out loss / token accuracy results (`--heldout`)

# Metric preference per group: the first one a task reports is its score (all higher-is-better).
_MC = ("acc_norm", "acc")
_GEN = ("f1", "exact_match", "contains", "em")


@dataclass(frozen=True)
class Group:
    name: str
    tasks: tuple[str, ...]  # lm-eval task or group names
    metrics: tuple[str, ...]
    embedded: bool = False


# Paper section 4.1; the paper counts 120 leaf tasks over these six groups.
PAPER_GROUPS: dict[str, Group] = {
    g.name: g
    for g in (
        Group(
            "MC9",
            (
                "arc_easy",
                "arc_challenge",
                "boolq",
                "commonsense_qa",
                "hellaswag",
                "openbookqa",
                "piqa",
                "social_iqa",
                "winogrande",
            ),
            _MC,
        ),
        Group("GEN5", ("coqa", "squad_completion", "nq_open", "triviaqa", "drop"), _GEN),
        Group("AGIEval", ("agieval_en",), _MC),
        Group("BBH", ("bbh",), ("exact_match",)),
        Group("MMLU", ("mmlu",), ("acc",)),
        Group("MMLU-Pro", ("mmlu_pro",), ("exact_match",)),
    )
}

EMBEDDED_GROUPS: dict[str, Group] = {d: Group(d, (f"{EMBEDDED_PREFIX}{d}",), ("acc",), embedded=True) for d in DOMAINS}

# Aliases accepted by --tasks, case-insensitive.
_ALIASES: dict[str, tuple[str, ...]] = {
    "embedded": tuple(EMBEDDED_GROUPS),
    "paper": tuple(PAPER_GROUPS),
    **{g.lower(): (g,) for g in PAPER_GROUPS},
    "mmlu_pro": ("MMLU-Pro",),
    **{f"embedded:{d}": (d,) for d in EMBEDDED_GROUPS},
}


@dataclass(frozen=True)
class TaskPlan:
    """The resolved `--tasks`: groups to run, and loose lm-eval task names (each its own group)."""

    groups: tuple[Group, ...]

    @property
    def embedded(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.embedded)

    @property
    def online(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if not g.embedded)

    def group_of(self, task: str) -> Group | None:
        for g in self.groups:
            if task in g.tasks:
                return g
        return None


def resolve_tasks(spec: str | Sequence[str]) -> TaskPlan:
    """`embedded`, `paper`, group names (MC9, GEN5, AGIEval, BBH, MMLU, MMLU-Pro, or an embedded domain as
    `embedded:code` or `code`), or lm-eval task names (`lmeval:NAME` or any other name: its own group,
    metric acc_norm/acc/exact_match/f1, whichever it reports first). Comma-separated or a list."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) for s in s.split(",")]
    items = [s for s in items if s]
    if not items:
        raise ValueError("--tasks: give at least one task or group")
    groups: dict[str, Group] = {}
    for item in items:
        low = item.lower()
        if low in _ALIASES:
            for name in _ALIASES[low]:
                groups[name] = PAPER_GROUPS.get(name) or EMBEDDED_GROUPS[name]
        elif item in EMBEDDED_GROUPS:
            groups[item] = EMBEDDED_GROUPS[item]
        elif low.startswith(EMBEDDED_PREFIX) and low[len(EMBEDDED_PREFIX) :] in EMBEDDED_GROUPS:
            d = low[len(EMBEDDED_PREFIX) :]
            groups[d] = EMBEDDED_GROUPS[d]
        elif low.startswith("embedded:"):
            raise ValueError(f"--tasks: unknown embedded domain {item!r}; expected one of {', '.join(DOMAINS)}")
        else:
            name = item.removeprefix("lmeval:")
            # Unknown names are checked against lm-eval's index when the run starts (it needs lm-eval).
            groups[name] = Group(name, (name,), (*_MC, "exact_match", *_GEN))
    return TaskPlan(tuple(groups.values()))


def known_names() -> list[str]:
    return sorted({*_ALIASES, *(t for g in EMBEDDED_GROUPS.values() for t in g.tasks)})
