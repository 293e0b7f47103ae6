"""The results store: one JSON object per line, keyed by (mixture, expert, rank, active, task).

A sweep appends each point as it is measured, so a run that stops resumes where it was and never
evaluates a point twice. Every score is "higher is better" (losses are stored as their own metric
alongside, never as the score), so selection and analysis need no per-task direction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Key = tuple[str, str | None, int | None, int, str]


@dataclass(frozen=True)
class Result:
    mixture: str  # e.g. "code@8" for a 2-expert sweep point, "hetero-proxy", "homo-8", "flexolmo"
    expert: str | None  # the one non-public expert of a sweep point; None for a full mixture
    rank: int | None  # that expert's rank; None for a full-size expert or a full mixture
    active: int  # experts routed per token (top-k)
    task: str  # task name, e.g. "heldout_code" or an lm-eval task
    group: str  # the group the task belongs to (paper: MC9, GEN5, ...; embedded: a domain)
    metric: str  # what `score` is, e.g. "acc", "acc_norm", "token_acc"
    score: float  # higher is better
    n: int = 0  # examples (or tokens) behind the score
    params: int | None = None  # total parameters of the evaluated mixture
    extra: dict[str, float] = field(default_factory=dict)  # e.g. {"loss": 2.1, "ppl": 8.2}

    @property
    def key(self) -> Key:
        return (self.mixture, self.expert, self.rank, self.active, self.task)


class ResultStore:
    """Append-only JSONL file. A torn last line (a crash mid-write) is ignored, not fatal."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._by_key: dict[Key, Result] = {}
        if self.path.exists():
            for result in _read(self.path):
                self._by_key[result.key] = result

    def __contains__(self, key: Key) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: Key) -> Result | None:
        return self._by_key.get(key)

    def records(self) -> list[Result]:
        return list(self._by_key.values())

    def append(self, results: Iterable[Result]) -> None:
        """Write the results durably (fsync) before they count as measured."""
        new = [r for r in results if r.key not in self._by_key]
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            for r in new:
                fh.write(json.dumps(asdict(r), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for r in new:
            self._by_key[r.key] = r


def _read(path: Path) -> Iterator[Result]:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        # A final line without its newline is an interrupted append: cut it, that point is measured again.
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as fh:
            fh.truncate(len(data))
    for i, line in enumerate(data.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            raw: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i + 1}: not a JSON object; the results store is corrupt") from None
        try:
            yield Result(**raw)
        except TypeError as e:
            raise ValueError(f"{path}:{i + 1}: not a result record ({e})") from None
