"""The training loop shared by the public model and the experts: AdamW, linear warmup then cosine decay,
gradient accumulation, fp32 or bf16 autocast, clipping, held-out evaluation, and checkpoints that resume
exactly (bit-identical weights after N straight steps or N/2 + resume + N/2).

Partly frozen tensors: FlexOlmo trains one router row inside a (E, H) router. `masks` names such
parameters with a boolean mask (True = trainable, broadcast to the parameter). A gradient hook zeroes
the frozen elements, and the parameter's decoupled weight decay is applied here through the mask
(AdamW itself gets weight_decay=0 for it), so frozen elements stay bit-identical: Adam's update of an
element whose gradient was always zero is exactly zero. `lr_scales` gives named parameters their own
peak lr (`lr * scale`, same schedule), e.g. a router row that should move slower than its expert.

A checkpoint is a folder: `state.safetensors` (trainable parameters, optimizer moments, torch RNG)
and `trainer.json` (step, config, scheduler, batch position, Python RNG, history). Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flexmore.storage import atomic_dir, atomic_write_text
from flexmore.training.data import BatchIterator

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECKPOINT_FORMAT = "flexmore-train-checkpoint"
CHECKPOINT_VERSION = 1
STATE_FILE = "state.safetensors"
RESULT_FILE = "flexmore_train.json"  # next to every trained artefact: its resolved config and results
TRAINER_FILE = "trainer.json"
# Fields that may differ on resume: they change what is logged or saved, never the trajectory.
_RESUMABLE_CHANGES = frozenset({"eval_every", "eval_batches", "checkpoint_every", "device"})


def checkpoint_dir_for(out: Path) -> Path:
    """Where the training checkpoints of artefact `out` live until it is written: a hidden sibling folder."""
    return Path(out).with_name(f".{Path(out).name}.train")


def _positive_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def _float_in(owner: str, name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        x = float(value)  # type: ignore[arg-type]
        ok = (x > lo if lo_open else x >= lo) and x <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{owner}.{name} must be a number in {bracket}{lo}, {hi}], got {value!r}")


def check_device(owner: str, device: str) -> None:
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"{owner}.device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{owner}.device is {device!r}, but CUDA is not available")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `batch_size` sequences per micro-batch; an optimizer step sees
    `batch_size * grad_accum` sequences of `seq_len` tokens."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 20  # steps of linear warmup
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio on the last step
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only: norms and biases are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_accum: int = 1
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 0  # held-out evaluation every N steps (0: only after the last step)
    eval_batches: int = 8  # held-out batches per evaluation (always the same ones)
    checkpoint_every: int = 0  # 0: no checkpoints
    dtype: str = "float32"  # float32, or bfloat16 autocast (parameters and optimizer stay fp32)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        for name in ("steps", "batch_size", "grad_accum", "eval_batches"):
            _positive_int(owner, name, getattr(self, name))
        _positive_int(owner, "seq_len", self.seq_len, 2)  # one prediction needs two tokens
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            _positive_int(owner, name, getattr(self, name), 0)
        if self.warmup >= self.steps:
            raise ValueError(f"{owner}.warmup must be below steps ({self.steps}), got {self.warmup!r}")
        _float_in(owner, "lr", self.lr, 0.0, 10.0, lo_open=True)
        _float_in(owner, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _float_in(owner, "weight_decay", self.weight_decay, 0.0, 1e3)
        _float_in(owner, "beta1", self.beta1, 0.0, 0.999999)
        _float_in(owner, "beta2", self.beta2, 0.0, 0.999999)
        _float_in(owner, "clip", self.clip, 0.0, 1e9)
        if self.dtype not in DTYPES:
            raise ValueError(f"{owner}.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(owner, self.device)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of `lr` for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup - 1))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast(config: TrainConfig) -> torch.autocast:
    device_type = "cuda" if config.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=DTYPES[config.dtype], enabled=config.dtype != "float32")


@dataclass(frozen=True)
class HeldoutStats:
    loss: float  # mean token cross-entropy (nats)
    token_acc: float  # share of next tokens that are the argmax prediction
    tokens: int  # predictions behind both


@torch.no_grad()
def heldout_stats(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int,
    max_batches: int | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> HeldoutStats:
    """Next-token cross-entropy and accuracy on packed blocks (N, seq_len), in batches; `progress(done,
    total)` after each batch (blocks)."""
    config = config or TrainConfig()
    was_training = model.training
    model.eval()
    n = blocks.shape[0] if max_batches is None else min(blocks.shape[0], max_batches * batch_size)
    if n == 0:
        raise ValueError("heldout_loss: no held-out blocks")
    total = torch.zeros((), dtype=torch.float64)
    correct = 0
    count = 0
    try:
        for start in range(0, n, batch_size):
            batch = blocks[start : min(start + batch_size, n)].to(config.device)  # (B, T)
            with autocast(config):
                logits = model(input_ids=batch).logits  # (B, T, V)
            targets = batch[:, 1:]  # (B, T-1)
            ce = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += ce.to("cpu", torch.float64)
            correct += int((logits[:, :-1].argmax(-1) == targets).sum())
            count += targets.numel()
            if progress is not None:
                progress(min(start + batch_size, n), n)
    finally:
        model.train(was_training)
    return HeldoutStats(loss=float(total) / count, token_acc=correct / count, tokens=count)


def heldout_loss(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int,
    max_batches: int | None = None,
    config: TrainConfig | None = None,
) -> float:
    """Mean token cross-entropy (nats) of next-token prediction on packed blocks (N, seq_len)."""
    return heldout_stats(model, blocks, batch_size=batch_size, max_batches=max_batches, config=config).loss


@dataclass(frozen=True)
class TrainStatus:
    """What a progress callback sees after every optimizer step."""

    step: int
    steps: int
    loss: float  # training loss of this step (mean over its micro-batches)
    lr: float
    tokens_per_s: float
    eval_loss: float | None  # the latest held-out loss, if any


@dataclass
class TrainResult:
    step: int
    tokens: int
    seconds: float  # wall time of the optimizer steps and evaluations, summed over resumes
    train_loss: float | None
    eval_loss: float | None
    history: list[dict[str, float | None]] = field(default_factory=list)  # one entry per evaluation


class Trainer:
    """Trains the parameters of `model` that require grad, reading `batches` (packed blocks)."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        batches: BatchIterator,
        heldout: torch.Tensor | None = None,
        *,
        masks: Mapping[str, torch.Tensor] | None = None,
        lr_scales: Mapping[str, float] | None = None,
        checkpoint_dir: Path | None = None,
    ) -> None:
        if batches.blocks.shape[1] != config.seq_len:
            raise ValueError(f"blocks have seq_len {batches.blocks.shape[1]}, TrainConfig.seq_len is {config.seq_len}")
        if batches.batch_size != config.batch_size:
            raise ValueError(f"BatchIterator.batch_size is {batches.batch_size}, TrainConfig has {config.batch_size}")
        self.model, self.config, self.batches, self.heldout = model, config, batches, heldout
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.params: dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad)")
        self.masks = self._check_masks(masks or {})
        for name, mask in self.masks.items():
            # Replace, not scale, the frozen entries: NaN * 0 would still be NaN. The hook stays on the
            # parameter (harmless without backward; idempotent if another Trainer adds its own).
            self.params[name].register_hook(lambda g, m=mask: torch.where(m, g, torch.zeros_like(g)))
        self.lr_scales = dict(lr_scales or {})
        for name, scale in self.lr_scales.items():
            if name not in self.params or not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"lr_scales[{name!r}] = {scale!r}: needs a trainable parameter and a positive scale")
        # One AdamW group per (decay kind, lr scale); the scheduler scales every group's lr alike.
        groups: dict[tuple[str, float], list[str]] = {}
        for name, p in self.params.items():
            kind = "masked" if name in self.masks else "decay" if p.ndim >= 2 else "no_decay"
            groups.setdefault((kind, self.lr_scales.get(name, 1.0)), []).append(name)
        self._group_names = list(groups.values())
        self._group_of = {n: i for i, names in enumerate(self._group_names) for n in names}
        wd = {"decay": config.weight_decay, "no_decay": 0.0, "masked": 0.0}
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [self.params[n] for n in names], "weight_decay": wd[kind], "lr": config.lr * scale}
                for (kind, scale), names in groups.items()
            ],
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            eps=1e-8,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.step = 0
        self.tokens = 0
        self.seconds = 0.0
        self.train_loss: float | None = None
        self.eval_loss: float | None = None
        self.history: list[dict[str, float | None]] = []

    def _check_masks(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, mask in masks.items():
            if name not in self.params:
                raise ValueError(f"mask for {name!r}: no such trainable parameter")
            p = self.params[name]
            if mask.dtype != torch.bool or torch.broadcast_shapes(mask.shape, p.shape) != p.shape:
                raise ValueError(f"mask for {name!r} must be bool and broadcast to {tuple(p.shape)}")
            out[name] = mask.to(p.device)
        return out

    # -- training ------------------------------------------------------------------------------
    def run(self, until: int | None = None, progress: Callable[[TrainStatus], None] | None = None) -> TrainResult:
        """Train up to optimizer step `until` (default: config.steps); returns where it stands."""
        config = self.config
        target = config.steps if until is None else min(until, config.steps)
        self.model.train()
        while self.step < target:
            start = time.perf_counter()
            lr = self.config.lr * lr_factor(self.step, self.config)  # this step's peak-relative lr
            loss = self._optimizer_step()
            step_seconds = time.perf_counter() - start
            if (config.eval_every and self.step % config.eval_every == 0) or self.step == config.steps:
                self.evaluate()
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            if config.checkpoint_every and self.checkpoint_dir and self.step % config.checkpoint_every == 0:
                self.save_checkpoint(self.checkpoint_dir)
            if progress is not None:
                speed = config.tokens_per_step / step_seconds
                status = TrainStatus(self.step, config.steps, loss, lr, speed, self.eval_loss)
                progress(status)
        return self.result()

    def _optimizer_step(self) -> float:
        config = self.config
        losses = []
        for _ in range(config.grad_accum):
            batch = next(self.batches).to(config.device)  # (B, T)
            with autocast(config):
                loss = self.model(input_ids=batch, labels=batch).loss
            (loss / config.grad_accum).backward()
            losses.append(loss.detach().float())
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), config.clip)
        self._decay_masked()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += config.tokens_per_step
        self.train_loss = float(torch.stack(losses).mean())
        return self.train_loss

    @torch.no_grad()
    def _decay_masked(self) -> None:
        # AdamW's decoupled decay `p *= 1 - lr * wd`, on the trainable elements only (factor 1.0 elsewhere).
        if not self.masks or self.config.weight_decay == 0:
            return
        for name, mask in self.masks.items():
            p = self.params[name]
            if p.ndim < 2:
                continue  # vectors are never decayed (as the no_decay group)
            factor = 1.0 - self.optimizer.param_groups[self._group_of[name]]["lr"] * self.config.weight_decay
            p.mul_(torch.where(mask, torch.tensor(factor, dtype=p.dtype, device=p.device), 1.0))

    def evaluate(self) -> float | None:
        if self.heldout is None:
            return None
        config = self.config
        self.eval_loss = heldout_loss(
            self.model, self.heldout, batch_size=config.batch_size, max_batches=config.eval_batches, config=config
        )
        self.history.append({"step": self.step, "train_loss": self.train_loss, "eval_loss": self.eval_loss})
        return self.eval_loss

    def result(self) -> TrainResult:
        return TrainResult(self.step, self.tokens, self.seconds, self.train_loss, self.eval_loss, list(self.history))

    # -- checkpoints ---------------------------------------------------------------------------
    def _ordered_names(self) -> list[str]:
        return [n for names in self._group_names for n in names]  # = the optimizer's state_dict indices

    def save_checkpoint(self, folder: Path) -> Path:
        """Write everything needed to resume exactly into `folder`, replacing it atomically."""
        names = self._ordered_names()
        tensors = {f"model.{n}": p.detach().to("cpu").contiguous() for n, p in self.params.items()}
        optim = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in optim["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{names[index]}.{key}"] = value.detach().to("cpu").contiguous()
                else:
                    scalars.setdefault(names[index], {})[key] = value
        groups = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            | {"params": [names[i] for i in g["params"]]}
            for g in optim["param_groups"]
        ]
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        version, mt, gauss = random.getstate()
        trainer = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "step": self.step,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "history": self.history,
            "config": asdict(self.config),
            "trainable": list(self.params),
            "masks": sorted(self.masks),
            "lr_scales": dict(sorted(self.lr_scales.items())),
            "optimizer": {"param_groups": groups, "scalars": scalars},
            "scheduler": self.scheduler.state_dict(),
            "batches": self.batches.state_dict(),
            "python_rng": [version, list(mt), gauss],
        }
        with atomic_dir(Path(folder), overwrite=True) as tmp:
            save_file(tensors, str(tmp / STATE_FILE), metadata={"format": CHECKPOINT_FORMAT})
            atomic_write_text(tmp / TRAINER_FILE, json.dumps(trainer, indent=1) + "\n")
        return Path(folder)

    def load_checkpoint(self, folder: Path) -> None:
        """Resume from `save_checkpoint(folder)`: same model, config and data, fresh objects."""
        folder = Path(folder)
        path = folder / TRAINER_FILE
        if not path.is_file() or not (folder / STATE_FILE).is_file():
            raise ValueError(f"{folder}: not a training checkpoint (needs {TRAINER_FILE} and {STATE_FILE})")
        trainer = json.loads(path.read_text())
        if trainer.get("format") != CHECKPOINT_FORMAT or trainer.get("format_version", 0) > CHECKPOINT_VERSION:
            raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} file")
        saved = trainer["config"]
        for f in fields(TrainConfig):
            mine = getattr(self.config, f.name)
            if f.name not in _RESUMABLE_CHANGES and saved.get(f.name) != mine:
                raise ValueError(
                    f"cannot resume from {folder}: TrainConfig.{f.name} is {mine!r} now but {saved.get(f.name)!r} there"
                )
        if trainer["trainable"] != list(self.params) or trainer["masks"] != sorted(self.masks):
            raise ValueError(f"cannot resume from {folder}: it trained other parameters than this model has trainable")
        if trainer["lr_scales"] != dict(sorted(self.lr_scales.items())):
            raise ValueError(f"cannot resume from {folder}: it used other per-parameter lr scales")
        tensors = load_file(str(folder / STATE_FILE))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[f"model.{name}"])
        index = {n: i for i, n in enumerate(self._ordered_names())}
        state: dict[int, dict[str, Any]] = {}
        prefix = "optimizer."
        for key, value in tensors.items():
            if key.startswith(prefix):
                name, _, slot = key[len(prefix) :].rpartition(".")
                state.setdefault(index[name], {})[slot] = value
        for name, extra in trainer["optimizer"]["scalars"].items():
            state.setdefault(index[name], {}).update(extra)
        groups = [
            g | {"params": [index[n] for n in g["params"]], "betas": tuple(g["betas"])}
            for g in trainer["optimizer"]["param_groups"]
        ]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.batches.load_state_dict(trainer["batches"])
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        version, mt, gauss = trainer["python_rng"]
        random.setstate((version, tuple(mt), gauss))
        self.step, self.tokens, self.seconds = trainer["step"], trainer["tokens"], trainer["seconds"]
        self.train_loss, self.eval_loss = trainer["train_loss"], trainer["eval_loss"]
        self.history = list(trainer["history"])
