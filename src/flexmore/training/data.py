"""Loading texts, splitting off a held-out set, packing into fixed-length blocks, and a resumable batch order.

Sources (`load_texts`):
- `embedded:<domain>` / `embedded:general`: the built-in corpus (`flexmore.training.corpus`);
  a domain gives its private share, `general` the public mix, so the two never share a document.
- a `.jsonl` file: one JSON object per line with a text field;
- a folder: every `.txt`/`.md`/`.py` file below it (sorted), one document per file;
  a folder written by `datasets.save_to_disk` is read with `datasets`;
- any other single file: one document;
- `owner/name`: a Hugging Face Hub dataset (needs the optional `datasets` package).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexmore.training.corpus import DOMAINS, GENERAL, CorpusConfig, build_domain, build_general, unit_hash

EMBEDDED_PREFIX = "embedded:"
TEXT_SUFFIXES = (".txt", ".md", ".py")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


# ---------------------------------------------------------------- loading


def load_texts(
    source: str | Path,
    text_field: str = "text",
    split: str | None = None,
    *,
    corpus: CorpusConfig | None = None,
    max_docs: int | None = None,
) -> list[str]:
    """Documents from `source` (see the module docstring), empty and whitespace-only ones dropped.

    `split` names a split of a Hugging Face dataset (default "train"); other sources have none.
    `max_docs` keeps the first documents only (a Hub dataset is then streamed, not downloaded whole).
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be positive or None, got {max_docs!r}")
    text = str(source)
    path = Path(source).expanduser()
    if text.startswith(EMBEDDED_PREFIX):
        _no_split(split, text)
        docs = _embedded(text[len(EMBEDDED_PREFIX) :], corpus)
    elif path.is_dir() and any((path / marker).is_file() for marker in _DATASETS_MARKERS):
        docs = _datasets_folder(path, text_field, split, max_docs)
    elif path.is_dir():
        _no_split(split, text)
        docs = _folder(path)
    elif path.is_file():
        _no_split(split, text)
        docs = _jsonl(path, text_field) if path.suffix == ".jsonl" else _one_file(path)
    elif _HUB_ID.match(text) and not text.endswith((".jsonl", ".json", *TEXT_SUFFIXES)):
        docs = _hub(text, text_field, split, max_docs)
    else:
        raise FileNotFoundError(
            f"no such file or folder: {text!r} (a source is a path, {EMBEDDED_PREFIX}<domain> with domain one of "
            f"{', '.join((*DOMAINS, GENERAL))}, or a Hugging Face dataset id owner/name)"
        )
    docs = [d for d in docs if d.strip()]
    if max_docs is not None:
        docs = docs[:max_docs]
    if not docs:
        raise ValueError(f"{text}: no non-empty documents")
    return docs


def _no_split(split: str | None, source: str) -> None:
    if split is not None:
        raise ValueError(f"split={split!r} applies only to Hugging Face datasets, not to {source!r}")


def _embedded(name: str, corpus: CorpusConfig | None) -> list[str]:
    if name == GENERAL:
        return build_general(corpus)
    if name not in DOMAINS:
        raise ValueError(f"unknown embedded domain {name!r}; expected one of {', '.join((*DOMAINS, GENERAL))}")
    return build_domain(name, corpus)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _one_file(path: Path) -> list[str]:
    return [_read(path)]


def _folder(root: Path) -> list[str]:
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise ValueError(f"{root}: no {'/'.join(TEXT_SUFFIXES)} files in this folder or below")
    return [_read(p) for p in files]


def _jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                fields = ", ".join(map(str, record)) or "none"
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} (fields: {fields})")
            value = record[text_field]
            if not isinstance(value, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not a string")
            docs.append(value)
    return docs


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "Hugging Face datasets need the optional `datasets` package: pip install 'datasets>=4,<5'"
        ) from None
    return datasets


def _column(rows: Any, text_field: str, where: str, max_docs: int | None) -> list[str]:
    names = getattr(rows, "column_names", None)
    if names is not None and text_field not in names:
        raise ValueError(f"{where}: no column {text_field!r} (columns: {', '.join(names)})")
    docs = []
    for row in rows:
        value = row[text_field]
        if isinstance(value, str):
            docs.append(value)
        if max_docs is not None and len(docs) >= max_docs:
            break
    return docs


def _datasets_folder(path: Path, text_field: str, split: str | None, max_docs: int | None) -> list[str]:
    datasets = _import_datasets()
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        split = split or "train"
        if split not in data:
            raise ValueError(f"{path}: no split {split!r} (splits: {', '.join(data)})")
        data = data[split]
    elif split is not None:
        raise ValueError(f"{path}: a single saved Dataset has no splits (got split={split!r})")
    return _column(data, text_field, str(path), max_docs)


def _hub(repo_id: str, text_field: str, split: str | None, max_docs: int | None) -> list[str]:
    datasets = _import_datasets()
    split = split or "train"
    # Streaming when capped: a CPU run that needs 10k documents must not download a 100 GB dataset.
    rows = datasets.load_dataset(repo_id, split=split, streaming=max_docs is not None)
    return _column(rows, text_field, f"{repo_id} [{split}]", max_docs)


# ---------------------------------------------------------------- splitting and packing


def split_heldout(texts: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, heldout), each in input order. A document is held out iff a hash of (seed, its text) falls
    below `fraction`: its side depends neither on the order nor on the other documents, and duplicates
    land on the same side. With >= 2 documents neither side is empty (the one document nearest the
    threshold moves over if needed; only this fallback looks at the other documents)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    scores = [unit_hash(f"heldout:{seed}", t) for t in texts]
    held = [s < fraction for s in scores]
    if len(texts) >= 2 and not any(held):
        held[min(range(len(texts)), key=scores.__getitem__)] = True
    if len(texts) >= 2 and all(held):
        held[max(range(len(texts)), key=scores.__getitem__)] = False
    train = [t for t, h in zip(texts, held, strict=True) if not h]
    heldout = [t for t, h in zip(texts, held, strict=True) if h]
    return train, heldout


def pack(
    texts: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    *,
    eos_token_id: int | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Tokenise documents, append eos after each, concatenate, and cut into (N, seq_len) LongTensor
    blocks; the incomplete tail is dropped. Blocks cross document boundaries (eos marks them).

    `tokenizer` is any `transformers` tokenizer; a literal "<|endoftext|>" inside a document is encoded
    as plain text (split_special_tokens), so data cannot forge a document boundary.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: pass eos_token_id")
    ids = token_stream(texts, tokenizer, eos, batch_size)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(texts)} documents give {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len).copy())  # (N, seq_len) int64


def token_stream(texts: Sequence[str], tokenizer: Any, eos_token_id: int, batch_size: int = 1000) -> np.ndarray:
    """All documents' token ids with eos after each, as one int64 array."""
    parts: list[np.ndarray] = []
    eos = np.array([eos_token_id], dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        # One call per batch: the Rust tokenizer encodes a batch in parallel.
        encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for doc in encoded:
            parts.append(np.asarray(doc, dtype=np.int64))
            parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 of the documents in order: record it next to an artefact to name the data it saw."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "big"))  # length-prefixed: ["ab", "c"] and ["a", "bc"] differ
        h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------- resumable batch order


class BatchIterator:
    """Endless batches of packed blocks, in a seeded shuffle that changes every epoch, resumable exactly.

    `state_dict()` (plain ints and strings, JSON-safe) records the epoch and the number of batches
    already taken in it; a new iterator over the same blocks given `load_state_dict(state)` yields the
    same remaining batches as the original would have. The last incomplete batch of an epoch is dropped,
    so every batch is (batch_size, seq_len).
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if blocks.ndim != 2:
            raise ValueError(f"blocks must be (N, seq_len), got shape {tuple(blocks.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if blocks.shape[0] < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {blocks.shape[0]} blocks")
        self.blocks = blocks  # (N, seq_len)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # batches already taken in this epoch
        self._data_id = _tensor_digest(blocks)
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.blocks.shape[0] // self.batch_size

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            n = self.blocks.shape[0]
            if self.shuffle:
                # A fresh generator per epoch: the order depends on (seed, epoch) only; resuming needs no RNG state.
                gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
                self._order = torch.randperm(n, generator=gen)
            else:
                self._order = torch.arange(n)
        return self._order

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        start = self.index * self.batch_size
        rows = self._epoch_order()[start : start + self.batch_size]
        self.index += 1
        return self.blocks[rows]  # (batch_size, seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "num_blocks": int(self.blocks.shape[0]),
            "data": self._data_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; refuses a state taken over other blocks or another batch order."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "batch_size", "num_blocks", "data"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume: {key} is {mine[key]!r} here but {state.get(key)!r} in the state")
        epoch, index = state["epoch"], state["index"]
        if not (
            isinstance(epoch, int) and epoch >= 0 and isinstance(index, int) and 0 <= index <= self.batches_per_epoch
        ):
            raise ValueError(f"cannot resume: bad position epoch={epoch!r} index={index!r}")
        self.epoch, self.index, self._order = epoch, index, None


def _mix(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"flexmore:batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # manual_seed takes a non-negative int64


def _tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
