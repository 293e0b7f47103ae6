"""`flexmore pretrain` and `flexmore train-expert`: the public model, and one expert trained in isolation."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flexmore.cli.common import console, progress_bar, user_errors

if TYPE_CHECKING:
    from flexmore.training.loop import TrainConfig, TrainStatus

# Options shared by both commands; None keeps the command's default TrainConfig value.
Steps = Annotated[int | None, typer.Option(help="Optimizer steps.")]
Seed = Annotated[int | None, typer.Option(help="Seed of the weights, batch order and held-out split.")]
BatchSize = Annotated[int | None, typer.Option(help="Sequences per micro-batch.")]
SeqLen = Annotated[int | None, typer.Option(help="Tokens per sequence.")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate (AdamW).")]
Warmup = Annotated[int | None, typer.Option(help="Linear warmup steps.")]
GradAccum = Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")]
WeightDecay = Annotated[float | None, typer.Option(help="Decoupled weight decay on matrices.")]
EvalEvery = Annotated[int | None, typer.Option(help="Held-out evaluation every N steps (0: at the end).")]
CheckpointEvery = Annotated[
    int | None, typer.Option(help="Save a resumable checkpoint every N steps (0: never) in .OUT.train/.")
]
Dtype = Annotated[str | None, typer.Option(help="float32 | bfloat16 (autocast).")]
Device = Annotated[str | None, typer.Option(help="cpu or cuda[:N].")]
Resume = Annotated[bool, typer.Option(help="Continue from the checkpoint in .OUT.train/ if there is one.")]
Overwrite = Annotated[bool, typer.Option(help="Replace OUT if it exists.")]


def _train_config(base: TrainConfig, **overrides: Any) -> TrainConfig:
    given = {k: v for k, v in overrides.items() if v is not None}
    if "steps" in given and "warmup" not in given:
        given["warmup"] = min(base.warmup, max(0, given["steps"] // 10))  # keep warmup below a short run
    if "steps" in given and "eval_every" not in given and base.eval_every >= given["steps"]:
        given["eval_every"] = 0
    return replace(base, **given)


@contextmanager
def _training_bar(label: str) -> Iterator[Callable[[TrainStatus], None]]:
    with progress_bar(label) as update:

        def report(s: TrainStatus) -> None:
            held = f"  held-out {s.eval_loss:.3f}" if s.eval_loss is not None else ""
            update(s.step, s.steps, f"loss {s.loss:.3f}{held}  {s.tokens_per_s / 1e3:.1f}k tok/s")

        yield report


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours


def pretrain_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output FlexOlmo checkpoint folder (1 expert).")],
    data: Annotated[str, typer.Option(help="Training text: embedded:general, a folder, a .jsonl, a hub id.")] = (
        "embedded:general"
    ),
    steps: Steps = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    seq_len: SeqLen = None,
    lr: Lr = None,
    warmup: Warmup = None,
    grad_accum: GradAccum = None,
    weight_decay: WeightDecay = None,
    eval_every: EvalEvery = None,
    checkpoint_every: CheckpointEvery = None,
    dtype: Dtype = None,
    device: Device = None,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary, trained locally on the data.")] = 4096,
    hidden_size: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    intermediate_size: Annotated[int, typer.Option(help="FFN (expert) width.")] = 352,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    resume: Resume = True,
    overwrite: Overwrite = False,
) -> None:
    """Pretrain the tiny public model: a 1-expert FlexOlmo with a locally trained BPE tokenizer, saved
    as a normal FlexOlmo checkpoint that `train-expert` upcycles and `compose --public` reads."""
    from flexmore.training.public import PretrainConfig, PublicModelConfig, default_public_train, pretrain

    _quiet_transformers()
    with user_errors():
        train = _train_config(
            default_public_train(),
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            warmup=warmup,
            grad_accum=grad_accum,
            weight_decay=weight_decay,
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            dtype=dtype,
            device=device,
        )
        model = PublicModelConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
        )
        config = PretrainConfig(out=out, data=data, model=model, train=train, overwrite=overwrite)
        with _training_bar("pretrain") as report:
            result = pretrain(config, report, resume=resume)
    console.print(
        f"public model: {result.parameters:,} parameters, held-out loss {result.heldout_loss:.4f} nats/token "
        f"(unigram {result.unigram_loss:.4f}); {result.train.tokens:,} tokens in {result.seconds:.1f}s -> {out}"
    )


def _embedding_function(spec: str | None) -> Callable[[Any], Any] | None:
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--router-init must be MODULE:FUNCTION, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--router-init {spec!r}: cannot import it ({err})") from err
    if not callable(fn):
        raise ValueError(f"--router-init {spec!r} is not callable")
    return fn


def train_expert_command(
    public: Annotated[str, typer.Option(help="The public FlexOlmo checkpoint (from `flexmore pretrain`).")],
    data: Annotated[str, typer.Option(help="The owner's documents: embedded:<domain>, a folder, a .jsonl, a hub id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: a 2-expert checkpoint, or an expert folder.")],
    name: Annotated[str | None, typer.Option(help="Expert name (default: from --data).")] = None,
    rank: Annotated[
        int | None, typer.Option(help="Train a low-rank expert W_public + B A of this rank (default: full expert).")
    ] = None,
    steps: Steps = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    seq_len: SeqLen = None,
    lr: Lr = None,
    warmup: Warmup = None,
    grad_accum: GradAccum = None,
    weight_decay: WeightDecay = None,
    eval_every: EvalEvery = None,
    checkpoint_every: CheckpointEvery = None,
    dtype: Dtype = None,
    device: Device = None,
    max_docs: Annotated[int | None, typer.Option(help="Use the first N documents only.")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl / dataset records.")] = "text",
    router_init: Annotated[
        str | None,
        typer.Option(help="MODULE:FUNCTION mapping a list of documents to (N, hidden) embeddings for the router row."),
    ] = None,
    router_scale: Annotated[float | None, typer.Option(help="Router row scale (logit of a centroid token).")] = None,
    router_lr_ratio: Annotated[
        float | None, typer.Option(help="Router row lr as a fraction of the expert's (0: keep the initial row).")
    ] = None,
    router_bias: Annotated[
        bool, typer.Option(help="Learn FlexOlmo's non-positive router bias (low-rank experts only).")
    ] = False,
    resume: Resume = True,
    overwrite: Overwrite = False,
) -> None:
    """Train one expert in isolation (FlexOlmo): the public model frozen, the new expert (full, or
    low-rank with --rank) and its router row trained top-2 of 2 on the owner's data only."""
    from flexmore.training.expert import ExpertTrainConfig, default_expert_train, train_expert

    _quiet_transformers()
    with user_errors():
        train = _train_config(
            default_expert_train(rank),
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            warmup=warmup,
            grad_accum=grad_accum,
            weight_decay=weight_decay,
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            dtype=dtype,
            device=device,
        )
        config = ExpertTrainConfig(
            public=public,
            data=data,
            out=out,
            name=name,
            rank=rank,
            train=train,
            max_docs=max_docs,
            text_field=text_field,
            router_bias=router_bias,
        )
        if router_scale is not None:
            config = replace(config, router_scale=router_scale)
        if router_lr_ratio is not None:
            config = replace(config, router_lr_ratio=router_lr_ratio)
        embed = _embedding_function(router_init)
        start = time.perf_counter()
        with _training_bar(f"expert {config.expert_name}") as report:
            result = train_expert(config, report, embed=embed, resume=resume)
    kind = "full" if rank is None else f"rank {rank}"
    console.print(
        f"expert {result.name} ({kind}, {result.trainable_parameters:,} trained parameters): held-out loss "
        f"{result.public_loss:.4f} (public) -> {result.expert_loss:.4f} (public + expert) "
        f"in {time.perf_counter() - start:.1f}s -> {out}"
    )
