"""Instruction data: generated task families with checked answers (the embedded default, no download),
or Dolly-style records (instruction, context, response, category) from a JSONL file or the Hub, and
their partition over clients.

Embedded families (one per client under the pathological partition):
- arithmetic: "What is 37 plus 85?" -> "37 plus 85 is 122."
- sorting:    "Sort in ascending order: 42 7 19 3" -> "3 7 19 42"
- reversal:   "Reverse the order of the words: red cat sat mat" -> "mat sat cat red"
- capitals:   "What is the capital of Cetrorland?" -> "The capital of Cetrorland is Faklonfi."
              (the fictional world of `training.corpus`, whose facts the general mix teaches)
Every answer is computed, and `check` recomputes it from the prompt.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexmore.training.corpus import build_world

EMBEDDED = "embedded"
FAMILIES = ("arithmetic", "sorting", "reversal", "capitals")
DOLLY = "databricks/databricks-dolly-15k"
PROMPT = "### Instruction:\n{instruction}\n### Response:\n"
_WORDS = ("red", "cat", "sat", "mat", "big", "dog", "ran", "far", "sun", "hot", "day", "sea", "blue", "tree", "bird",
          "old", "new", "cup", "tea", "map", "pen", "box", "hat", "fox")  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    family: str  # the partition label (a task family, or Dolly's category)
    instruction: str
    response: str

    @property
    def prompt(self) -> str:
        return PROMPT.format(instruction=self.instruction)

    @property
    def text(self) -> str:
        return self.prompt + self.response


@functools.lru_cache(maxsize=2)
def _capitals(seed: int) -> tuple[tuple[str, str], ...]:
    return tuple((c.name, c.capital) for c in build_world(seed).countries)


def _arithmetic(rng: random.Random, _seed: int) -> Instruction:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Instruction("arithmetic", f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")


def _sorting(rng: random.Random, _seed: int) -> Instruction:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return Instruction(
        "sorting", "Sort in ascending order: " + " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))
    )


def _reversal(rng: random.Random, _seed: int) -> Instruction:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 6))]
    return Instruction("reversal", "Reverse the order of the words: " + " ".join(words), " ".join(reversed(words)))


def _capital(rng: random.Random, seed: int) -> Instruction:
    country, capital = rng.choice(_capitals(seed))
    return Instruction("capitals", f"What is the capital of {country}?", f"The capital of {country} is {capital}.")


GENERATORS: dict[str, Callable[[random.Random, int], Instruction]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "reversal": _reversal,
    "capitals": _capital,
}


def check(item: Instruction, seed: int = 0) -> bool:
    """Recompute the answer from the instruction alone."""
    text = item.instruction
    if item.family == "arithmetic":
        a, b = map(int, re.findall(r"\d+", text))
        return item.response == f"{a} plus {b} is {a + b}."
    if item.family == "sorting":
        nums = sorted(int(n) for n in text.split(":", 1)[1].split())
        return item.response == " ".join(map(str, nums))
    if item.family == "reversal":
        return item.response == " ".join(reversed(text.split(":", 1)[1].split()))
    if item.family == "capitals":
        country = text.removeprefix("What is the capital of ").removesuffix("?")
        return item.response == f"The capital of {country} is {dict(_capitals(seed))[country]}."
    raise ValueError(f"no checker for family {item.family!r}")


def generate(per_family: int, seed: int = 0, families: Sequence[str] = FAMILIES) -> list[Instruction]:
    """`per_family` distinct instructions of each family, seeded, family by family."""
    out: list[Instruction] = []
    for family in families:
        if family not in GENERATORS:
            raise ValueError(f"unknown task family {family!r}; expected one of {', '.join(GENERATORS)}")
        rng = random.Random(f"flexmore:flex:{family}:{seed}")
        seen: set[str] = set()
        for _ in range(per_family * 50):
            item = GENERATORS[family](rng, seed)
            if item.instruction not in seen:
                seen.add(item.instruction)
                out.append(item)
            if len(seen) == per_family:
                break
    return out


def load_instructions(
    source: str, per_family: int, seed: int = 0, families: Sequence[str] = FAMILIES
) -> list[Instruction]:
    """`embedded` (`families` of it), a Dolly-style JSONL file, or a Hub dataset id (needs a connection)."""
    if source == EMBEDDED:
        return generate(per_family, seed, families)
    path = Path(source).expanduser()
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif re.match(r"^[\w.-]+/[\w.-]+$", source):
        import datasets

        rows = list(datasets.load_dataset(source, split="train"))
    else:
        raise FileNotFoundError(f"--data {source!r}: expected 'embedded', a JSONL file or a Hub dataset id")
    items = []
    for i, row in enumerate(rows):
        missing = [k for k in ("instruction", "response", "category") if k not in row]
        if missing:
            raise ValueError(
                f"{source} record {i}: no field(s) {missing} (Dolly format: instruction, context, response, category)"
            )
        instruction = row["instruction"] + (f"\n{row['context']}" if row.get("context") else "")
        items.append(Instruction(str(row["category"]), instruction, row["response"]))
    return items


def partition(labels: Sequence[str], clients: int, scheme: str, seed: int = 0) -> list[list[int]]:
    """Indices per client. `pathological`: each label to one client (client i gets labels i, i+n, ...);
    `iid`: a seeded shuffle dealt round-robin; `dirichlet:ALPHA`: each label's items split over the
    clients in Dir(ALPHA) proportions."""
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    names = sorted(set(labels))
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    if scheme == "pathological":
        if clients > len(names):
            raise ValueError(
                f"pathological partition: {clients} clients but only {len(names)} task families "
                f"({', '.join(names)}); use at most {len(names)} clients or another partition"
            )
        owner = {name: i % clients for i, name in enumerate(names)}
        for j, label in enumerate(labels):
            parts[owner[label]].append(j)
    elif scheme == "iid":
        order = rng.permutation(len(labels))
        for k, j in enumerate(order):
            parts[k % clients].append(int(j))
    elif scheme.startswith("dirichlet:"):
        try:
            alpha = float(scheme.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"partition {scheme!r}: expected dirichlet:ALPHA with a number ALPHA") from None
        if not alpha > 0:
            raise ValueError(f"partition {scheme!r}: ALPHA must be > 0")
        for name in names:
            idx = [j for j, label in enumerate(labels) if label == name]
            idx = [idx[k] for k in rng.permutation(len(idx))]
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(np.array(idx), cuts)):
                parts[c].extend(int(j) for j in chunk)
    else:
        raise ValueError(f"unknown partition {scheme!r}; expected pathological, iid or dirichlet:ALPHA")
    for c, part in enumerate(parts):
        if len(part) < 2:
            raise ValueError(f"partition {scheme!r} gives client {c} {len(part)} item(s); use fewer clients")
        part.sort()
    return parts
