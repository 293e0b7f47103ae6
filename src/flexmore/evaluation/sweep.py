"""The rank sweep (paper section 3.3 and Table 1): public + one expert at each rank, evaluated.

Each expert is read (or, given as a full FlexOlmo expert, extracted) once at the sweep's largest rank;
every smaller rank is a prefix of those factors (docs/formats.md), composed in memory with
`mixture.compose_low_rank`, the same code `FlexMoReForCausalLM.compose` uses. A full-size expert also
gets its own `full` point (rank None), the paper's baseline. Each point is evaluated with both experts
active (FlexOlmo evaluates 2-expert models top-2 of 2) and appended to the results store as soon as it
is measured; points (and groups) already in the store are skipped, so a stopped sweep resumes.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexmore.evaluation import runner
from flexmore.evaluation.runner import EvalConfig, PointKey, pending
from flexmore.evaluation.store import Result, ResultStore
from flexmore.mixture.modeling import FlexMoReForCausalLM
from flexmore.storage import PROJECTIONS, FlexOlmoCheckpoint, first_difference, public_digest

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SweepExpert:
    """One expert of the sweep: a low-rank expert folder, or full expert `index` of a FlexOlmo checkpoint."""

    name: str
    path: Path
    index: int | None = None  # None: a low-rank expert folder

    @property
    def is_full(self) -> bool:
        return self.index is not None

    @classmethod
    def parse(cls, name: str, source: str | Path) -> SweepExpert:
        """`DIR` (a low-rank expert folder, or a 2-expert FlexOlmo checkpoint: expert 1) or `CHECKPOINT#INDEX`."""
        text = str(source)
        index: int | None = None
        if "#" in text:
            text, _, idx = text.rpartition("#")
            if not idx.isdigit():
                raise ValueError(f"expert {name!r}: {source!r}: expected CHECKPOINT#INDEX with an integer index")
            index = int(idx)
        path = Path(text)
        if index is None and (path / "expert.json").is_file():
            return cls(name, path)
        cfg = path / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(
                f"expert {name!r}: {path} is neither a low-rank expert folder (expert.json) nor a checkpoint"
            )
        raw = json.loads(cfg.read_text())
        if raw.get("model_type") != "flex_olmo":
            raise ValueError(f"expert {name!r}: {path} is a {raw.get('model_type')!r} checkpoint, not FlexOlmo")
        n = int(raw.get("num_experts", 1))
        if index is None:
            if n != 2:
                raise ValueError(f"expert {name!r}: {path} has {n} experts; say which with {path}#INDEX")
            index = 1  # FlexOlmo 2-expert models: expert 0 is public, expert 1 the domain expert
        if not 1 <= index < n:
            raise ValueError(f"expert {name!r}: {path} has domain experts [1, {n - 1}], got #{index}")
        return cls(name, path, index)


def power_of_two_ranks(max_rank: int) -> list[int]:
    """1, 2, 4, ... up to max_rank, and max_rank itself."""
    if max_rank < 1:
        raise ValueError(f"max rank must be >= 1, got {max_rank}")
    return sorted({1 << i for i in range(max_rank.bit_length()) if 1 << i <= max_rank} | {max_rank})


def point_key(expert: str, rank: int | None, active: int) -> PointKey:
    return (f"{expert}@{'full' if rank is None else rank}", expert, rank, active)


@dataclass
class SweepReport:
    evaluated: list[PointKey] = field(default_factory=list)
    skipped: list[PointKey] = field(default_factory=list)  # already in the store
    results: list[Result] = field(default_factory=list)  # measured by this run
    extracted: list[Path] = field(default_factory=list)


class _Public:
    """The public model, loaded once, and its digest (to check every expert was built on it)."""

    def __init__(self, source: str | Path) -> None:
        from transformers import FlexOlmoForCausalLM

        self.path = Path(source)
        self.ckpt = FlexOlmoCheckpoint(self.path)
        self.digest = public_digest(self.ckpt, 0)
        self.model = FlexOlmoForCausalLM.from_pretrained(self.path).eval()
        dims = self.ckpt.hidden_size, self.ckpt.intermediate_size
        self.max_rank = min(dims)

    def check(self, name: str, theirs: dict[str, str], where: str) -> None:
        diff = first_difference(self.digest, theirs)
        if diff is not None:
            raise ValueError(
                f"expert {name!r} ({where}) was not built on public model {self.path}: tensor {diff} differs"
            )


def _low_rank_model(public: _Public, name: str, folder: Path, rank: int, active: int) -> FlexMoReForCausalLM:
    from flexmore.lowrank.expert import ExpertReader, load_expert
    from flexmore.mixture.convert import ExpertParts, compose_low_rank

    reader = ExpertReader(folder)
    if reader.has_router_bias and any(reader.router_bias(L) < 0 for L in range(reader.meta.num_layers)):
        # compose() carries a learnt router bias into the model; the in-memory path has no bias field.
        return _composed_on_disk(public, name, folder, rank, active)
    expert = load_expert(folder, rank)  # reads only the rank-r prefix of the stored factors
    parts = ExpertParts(name=name, router=expert.router, factors=expert.factors)
    return compose_low_rank(public.model, [parts], top_k=active)


def _composed_on_disk(public: _Public, name: str, folder: Path, rank: int, active: int) -> FlexMoReForCausalLM:
    from flexmore.mixture.compose import ComposeConfig, ExpertSpec, compose

    with tempfile.TemporaryDirectory(prefix="flexmore-sweep-") as tmp:
        out = Path(tmp) / "mixture"
        compose(
            ComposeConfig(
                public=str(public.path), experts=(ExpertSpec(name, str(folder), rank),), out=out, top_k=active
            )
        )
        model, _ = runner.load_mixture(out, tokenizer=public.path)
    return model


def _full_model(public: _Public, expert: SweepExpert, active: int) -> FlexMoReForCausalLM:
    from flexmore.mixture.convert import ExpertParts, compose_low_rank

    assert expert.index is not None
    ckpt = FlexOlmoCheckpoint(expert.path)
    L = ckpt.num_layers
    dense = {(layer, p): ckpt.expert_weight(layer, expert.index, p) for layer in range(L) for p in PROJECTIONS}
    router = torch.stack([ckpt.router(layer)[expert.index] for layer in range(L)])  # (L, H)
    parts = ExpertParts(name=expert.name, router=router, dense=dense)
    return compose_low_rank(public.model, [parts], top_k=active)


def _extract(expert: SweepExpert, out: Path, max_rank: int, progress: Progress | None) -> Path:
    """The expert's low-rank folder at `max_rank`, extracted once and reused by later runs."""
    from flexmore.lowrank.expert import ExpertMeta
    from flexmore.lowrank.extract import ExtractConfig, extract

    folder = out / expert.name
    if (folder / "expert.json").is_file():
        meta = ExpertMeta.load(folder)
        same_source = Path(meta.source).resolve() == Path(expert.path).resolve()
        if same_source and meta.max_rank >= max_rank and meta.expert_index == expert.index:
            return folder
    assert expert.index is not None
    config = ExtractConfig(
        source=str(expert.path),
        out=out,
        experts=(expert.index,),
        names=(expert.name,),
        max_rank=max_rank,
        overwrite=True,
    )
    return extract(config, progress)[0]


def sweep(
    public: str | Path,
    experts: Mapping[str, str | Path],
    store: ResultStore | str | Path,
    config: EvalConfig | None = None,
    ranks: Sequence[int] | None = None,
    *,
    active: int = 2,
    full: bool = True,
    work: str | Path | None = None,
    tokenizer: Any = None,
    progress: Progress | None = None,
) -> SweepReport:
    """For each expert and rank: public + that expert at that rank, evaluated with `active` experts, appended
    to `store`. `experts`: name -> low-rank expert folder, or a FlexOlmo checkpoint (`DIR`, `DIR#INDEX`),
    which is extracted once into `work/experts/` (default: next to the store) and also evaluated full-size
    if `full`. `ranks` default: powers of two up to the expert's max rank (extraction: the largest useful
    rank, capped at min(hidden, intermediate))."""
    from transformers import AutoTokenizer

    from flexmore.lowrank.expert import ExpertMeta
    from flexmore.lowrank.extract import useful_max_rank

    config = config or EvalConfig()
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    work_dir = Path(work) if work is not None else store.path.parent / "sweep"
    specs = [SweepExpert.parse(n, p) for n, p in experts.items()]
    if not specs:
        raise ValueError("sweep: give at least one expert")
    if ranks is not None:
        ranks = sorted(set(ranks))
        if not ranks or ranks[0] < 1:
            raise ValueError(f"ranks must be positive, got {list(ranks)}")
    ckpt = FlexOlmoCheckpoint(Path(public))
    limit = min(ckpt.hidden_size, ckpt.intermediate_size)
    if ranks is not None and ranks[-1] > limit:
        raise ValueError(f"rank {ranks[-1]} exceeds min(hidden, intermediate) = {limit}")

    # The plan: (expert, rank) points, and what of each is still missing from the store.
    plan: list[tuple[SweepExpert, int | None, Any, bool]] = []
    for spec in specs:
        if spec.is_full:
            top = ranks[-1] if ranks is not None else useful_max_rank(ckpt.hidden_size, ckpt.intermediate_size)
        else:
            top = ExpertMeta.load(spec.path).max_rank
            if ranks is not None and ranks[-1] > top:
                raise ValueError(f"expert {spec.name!r}: rank {ranks[-1]} exceeds its stored max rank {top}")
        points: list[int | None] = list(ranks if ranks is not None else power_of_two_ranks(top))
        if spec.is_full and full:
            points.append(None)
        for rank in points:
            todo, heldout = pending(config.plan, store, point_key(spec.name, rank, active), config.heldout)
            plan.append((spec, rank, todo, heldout))

    report = SweepReport()
    total = len(plan)
    loaded: _Public | None = None
    tok = tokenizer
    lowrank_folder: dict[str, Path] = {}
    for i, (spec, rank, todo, heldout) in enumerate(plan):
        key = point_key(spec.name, rank, active)
        label = f"{spec.name} {'full' if rank is None else f'r={rank}'}"
        if progress is not None:
            progress(i, total, label)
        if not todo.groups and not heldout:
            report.skipped.append(key)
            continue
        if loaded is None:  # only when something is left to evaluate
            loaded = _Public(public)
            tok = tok if tok is not None else AutoTokenizer.from_pretrained(loaded.path)
        if rank is None:
            model = _full_model(loaded, spec, active)
            _check_full(loaded, spec)
        else:
            if spec.name not in lowrank_folder:
                if spec.is_full:
                    top = max(r for s, r, _, _ in plan if s is spec and r is not None)
                    folder = _extract(spec, work_dir / "experts", top, None)
                    report.extracted.append(folder)
                else:
                    folder = spec.path
                loaded.check(spec.name, ExpertMeta.load(folder).public_digest, str(folder))
                lowrank_folder[spec.name] = folder
            model = _low_rank_model(loaded, spec.name, lowrank_folder[spec.name], rank, active)
        results = runner.evaluate_mixture(
            model, tok, config, active=active, mixture=key[0], expert=spec.name, rank=rank, plan=todo, heldout=heldout
        )
        store.append(results)
        report.evaluated.append(key)
        report.results.extend(results)
        del model
    if progress is not None:
        progress(total, total, "done")
    return report


def _check_full(public: _Public, spec: SweepExpert) -> None:
    public.check(spec.name, public_digest(FlexOlmoCheckpoint(spec.path), 0), f"{spec.path}, its expert 0")
