"""The embedded proxy benchmarks: multiple-choice tasks generated from held-out documents, as lm-eval
task files (YAML + JSONL), deterministic from a seed.

Held-out documents are exactly those `train-expert --data embedded:<domain>` holds out: the private
share of the domain (`corpus.build_domain`, never in the public model's `general` mix) split by
`data.split_heldout` with the expert's held-out fraction and training seed. No model saw them.

Items, 4 candidates each (chance = 0.25):
- code, docs, facts: a held-out text prefix; the true next `continuation_chars` characters against
  three spans of the same length from other held-out documents of the domain. Every candidate starts at
  a whitespace character, where byte-level BPE starts a token, so no candidate is favoured by its cut.
- math: a held-out worksheet up to "A:" of a direct question (+, -, *, division with remainder); the
  answer, re-checked with `corpus.evaluate`, against three numerically close wrong answers.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from flexmore.evaluation.groups import EMBEDDED_PREFIX
from flexmore.storage import atomic_dir
from flexmore.training.corpus import DOMAINS, CorpusConfig, build_domain, evaluate
from flexmore.training.data import fingerprint, split_heldout
from flexmore.training.expert import ExpertTrainConfig
from flexmore.training.loop import TrainConfig

GENERATOR_VERSION = 2  # bump when items change: cached task folders are keyed by it
TEMPLATE = "flexmore_mc.yaml"
MANIFEST = "manifest.json"
_MATH_QA = re.compile(r"Q: (?P<q>[^\n]+?) = \?\nA: (?P<a>[^\n]+)")
_DIVMOD_Q = re.compile(r"^(\d+) divided by (\d+)$")
_DIVMOD_A = re.compile(r"^(-?\d+) remainder (\d+)$")


@dataclass(frozen=True)
class EmbeddedConfig:
    """Which held-out documents, and how items are cut from them. The split defaults are train-expert's."""

    seed: int = TrainConfig.seed  # the training seed: it picks the held-out documents
    heldout_fraction: float = ExpertTrainConfig.heldout_fraction
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    items: int = 500  # items generated per domain; `limit` evaluates the first N
    context_chars: int = 128
    continuation_chars: int = 40
    item_seed: int = 0  # picks items and distractors

    def __post_init__(self) -> None:
        for name in ("seed", "item_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EmbeddedConfig.{name} must be a non-negative int, got {value!r}")
        for name in ("items", "context_chars", "continuation_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EmbeddedConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"EmbeddedConfig.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")

    def key(self) -> str:
        """Names the generated task folder: same key, same items (on the same Python installation)."""
        raw = json.dumps(
            asdict(self) | {"version": GENERATOR_VERSION, "python": sys.version.split()[0]}, sort_keys=True
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


def heldout_documents(domain: str, config: EmbeddedConfig | None = None) -> list[str]:
    """The domain's held-out documents, exactly as train-expert holds them out."""
    config = config or EmbeddedConfig()
    docs = build_domain(domain, config.corpus)  # the private share: the public model never saw it
    _, held = split_heldout(docs, config.heldout_fraction, seed=config.seed)
    if not held:
        raise ValueError(f"embedded:{domain}: no held-out documents (fraction {config.heldout_fraction})")
    return held


# ---------------------------------------------------------------- items


def _starts(text: str) -> list[int]:
    """Positions of a whitespace character that follows a non-whitespace one: where a word token starts."""
    return [i for i in range(1, len(text)) if text[i].isspace() and not text[i - 1].isspace()]


def text_items(docs: Sequence[str], config: EmbeddedConfig, rng: random.Random) -> list[dict[str, Any]]:
    """Continuation items: prefix -> true next span vs spans of other held-out documents."""
    n = config.continuation_chars
    starts = [[i for i in _starts(d) if i + n <= len(d)] for d in docs]
    usable = [k for k, s in enumerate(starts) if s]
    # Documents with a start at least a few characters in, so that there is some context.
    cuttable = [k for k in usable if any(i >= 16 for i in starts[k])]
    if not cuttable:
        raise ValueError(f"{len(docs)} held-out documents are too short for continuation items")
    items: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(config.items * 20):
        if len(items) >= config.items:
            break
        k = rng.choice(cuttable)
        cut = rng.choice([i for i in starts[k] if i >= 16])
        if (k, cut) in seen:
            continue
        seen.add((k, cut))
        doc = docs[k]
        first = max(0, cut - config.context_chars)
        if first > 0:  # start after a whitespace so that the context does not open mid-word
            first = next((j + 1 for j in range(first, cut) if doc[j].isspace()), first)
        context = doc[first:cut]
        truth = doc[cut : cut + n]
        choices = [truth]
        for _ in range(50):
            if len(choices) == 4:
                break
            # Other documents; with a single held-out document, far-away spans of the same one.
            other = rng.choice([u for u in usable if u != k] if len(usable) > 1 else usable)
            j = rng.choice(starts[other])
            if other == k and abs(j - cut) < n:
                continue
            span = docs[other][j : j + n]
            if span not in choices:
                choices.append(span)
        if len(choices) < 4 or not context.strip():
            continue
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(truth)})
    if not items:
        raise ValueError("no continuation items could be cut from the held-out documents")
    return items


def _close_numbers(value: int, rng: random.Random, k: int) -> list[int]:
    """k distinct wrong answers near `value`: off by a little, by a digit's place, or with a digit swapped."""
    out: list[int] = []
    magnitude = max(1, len(str(abs(value))))
    steps = [1, 2, 3, 5, 9] + [10**p for p in range(1, magnitude)]
    for _ in range(200):
        if len(out) == k:
            break
        candidate = value + rng.choice((-1, 1)) * rng.choice(steps)
        if candidate != value and candidate not in out:
            out.append(candidate)
    return out


def math_items(docs: Sequence[str], config: EmbeddedConfig, rng: random.Random) -> list[dict[str, Any]]:
    """Direct questions of held-out worksheets; the answer re-checked, three close wrong answers."""
    found: list[tuple[str, str, int, str]] = []  # (doc, answer text, position of "A:" end, question)
    for doc in docs:
        for m in _MATH_QA.finditer(doc):
            found.append((doc, m["a"], m.start("a") - 1, m["q"]))
    rng.shuffle(found)
    items: list[dict[str, Any]] = []
    for doc, answer, end, question in found:
        if len(items) >= config.items:
            break
        if (dm := _DIVMOD_Q.match(question)) is not None:
            a, b = int(dm[1]), int(dm[2])
            q, r = divmod(a, b)
            if answer != f"{q} remainder {r}":
                raise ValueError(f"held-out math item has a wrong answer: {question} -> {answer}")
            wrong = [f"{x} remainder {r}" for x in _close_numbers(q, rng, 2)]
            wrong += [f"{q} remainder {x}" for x in _close_numbers(r, rng, 3) if 0 <= x < b and x != r]
            wrong = wrong[:3]
        else:
            value = evaluate(question)
            if answer != str(value):
                raise ValueError(f"held-out math item has a wrong answer: {question} -> {answer}")
            wrong = [str(x) for x in _close_numbers(value, rng, 3)]
        if len(wrong) < 3:
            continue
        first = max(0, end - config.context_chars)
        context = doc[first:end]  # ends with "A:"; the candidates bring the space
        choices = [" " + answer, *(" " + w for w in wrong)]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(" " + answer)})
    if not items:
        raise ValueError("no direct arithmetic questions in the held-out math documents")
    return items


def domain_items(domain: str, config: EmbeddedConfig | None = None) -> list[dict[str, Any]]:
    config = config or EmbeddedConfig()
    docs = heldout_documents(domain, config)
    rng = random.Random(f"flexmore:eval:{config.item_seed}:{domain}")
    return math_items(docs, config, rng) if domain == "math" else text_items(docs, config, rng)


# ---------------------------------------------------------------- lm-eval task files


def template() -> dict[str, Any]:
    import yaml

    text = resources.files("flexmore.evaluation").joinpath("tasks", TEMPLATE).read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def write_task(folder: Path, task: str, items: Sequence[dict[str, Any]], final: Path | None = None) -> Path:
    """One lm-eval task: `{task}.jsonl` (the items) and `{task}.yaml` (the shared definition made whole).
    The YAML names its data by absolute path under `final` (default `folder`; differs while `folder` is a
    temporary one that becomes `final`), so lm-eval can be given the folder from anywhere."""
    import yaml

    data = Path(folder) / f"{task}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    where = (Path(final) if final is not None else Path(folder)).resolve() / data.name
    cfg = template() | {"task": task, "dataset_kwargs": {"data_files": {"test": str(where)}}}
    path = Path(folder) / f"{task}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def task_folder(cache: Path, config: EmbeddedConfig | None = None) -> Path:
    """The folder of every embedded domain's task files for `config`, generated once (atomically; a few
    seconds, mostly building the corpus) and reused by every later run with the same config."""
    config = config or EmbeddedConfig()
    final = Path(cache) / f"embedded-{config.key()}"
    if (final / MANIFEST).is_file():
        return final
    with atomic_dir(final, overwrite=True) as tmp:
        manifest: dict[str, Any] = {"config": asdict(config), "version": GENERATOR_VERSION, "tasks": {}}
        for domain in DOMAINS:
            items = domain_items(domain, config)
            task = f"{EMBEDDED_PREFIX}{domain}"
            write_task(tmp, task, items, final=final)
            manifest["tasks"][task] = {
                "items": len(items),
                "heldout_docs_sha256": fingerprint(heldout_documents(domain, config)),
            }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return final
