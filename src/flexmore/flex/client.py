"""One client's side of a FLEx (or baseline) round, with no Flower: build the model from the pretrained
checkpoint, put in the global shared tensors and this client's personal parts (grafting them on first
participation), train locally, and hand back what travels and what stays.

Personal parts live on disk in OUT/clients/client-<i>/ (`personal.safetensors` + `personal.json`,
replaced atomically each round) so that a rerun resumes; the Flower ClientApp also keeps them in
`context.state`.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexmore.storage import atomic_dir
from flexmore.training.data import BatchIterator, load_texts, pack, split_heldout
from flexmore.training.loop import TrainConfig, Trainer, heldout_loss

from .adapters import family_of, frozen_names
from .aggregate import add_proximal_term
from .config import FlexConfig
from .gate import attach_grafts, graft_state, load_graft_state
from .graft import GraftChoice, choose_grafts, record_blocks
from .metrics import ExpertLoad, greedy_generate, rouge_l
from .shared import GRAFTED, build_trainable, enable_grafts, load_shared, shared_params, shared_state
from .tasks import Instruction, load_instructions, partition

PERSONAL, PERSONAL_META = "personal.safetensors", "personal.json"


@dataclass
class Personal:
    """What never leaves the client: grafts and gates (flex) or its own adapters (local)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # graft choices, the round it is from


def client_dir(config: FlexConfig, client: int) -> Path:
    return Path(config.out) / "clients" / f"client-{client}"


def save_personal(folder: Path, personal: Personal) -> None:
    with atomic_dir(folder, overwrite=True) as tmp:
        if personal.tensors:
            save_file({k: v.contiguous() for k, v in personal.tensors.items()}, str(tmp / PERSONAL))
        (tmp / PERSONAL_META).write_text(json.dumps(personal.meta, indent=2) + "\n")


def load_personal(folder: Path) -> Personal | None:
    if not (folder / PERSONAL_META).is_file():
        return None
    tensors = load_file(str(folder / PERSONAL)) if (folder / PERSONAL).is_file() else {}
    return Personal(tensors, json.loads((folder / PERSONAL_META).read_text()))


# ---------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def client_split(
    data: str, per_family: int, seed: int, clients: int, scheme: str, heldout: int, families: str
) -> tuple[tuple[tuple[Instruction, ...], tuple[Instruction, ...]], ...]:
    """Per client: (train, held-out) instructions."""
    items = load_instructions(data, per_family, seed, families.split(","))
    parts = partition([i.family for i in items], clients, scheme, seed)
    out = []
    for c, idx in enumerate(parts):
        rows = [items[j] for j in idx]
        n_held = min(heldout, len(rows) // 4) or 1
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1000 + c)).tolist()
        held = tuple(rows[j] for j in sorted(order[:n_held]))
        train = tuple(rows[j] for j in sorted(order[n_held:]))
        out.append((train, held))
    return tuple(out)


def data_for(config: FlexConfig, client: int) -> tuple[tuple[Instruction, ...], tuple[Instruction, ...]]:
    if not 0 <= client < config.clients:
        raise ValueError(f"client {client} is outside the run's {config.clients} clients")
    parts = client_split(config.data, config.examples_per_family, config.seed, config.clients, config.partition,
                         config.heldout_per_client, config.families)  # fmt: skip
    return parts[client]


@functools.lru_cache(maxsize=2)
def retention_blocks(tokenizer_dir: str, source: str, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """Held-out blocks of the general corpus (the pretraining split's held-out side): (n, seq_len)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    _, held = split_heldout(load_texts(source), 0.05, seed=seed)
    return pack(held, tokenizer, seq_len)[:n]


# ---------------------------------------------------------------- the model


def load_model(config: FlexConfig) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
    family_of(model)  # a clear error for an unsupported family, before anything else
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    nn.Module.to(model, config.device)
    return model, tokenizer


def graft_width(config: FlexConfig, model: nn.Module) -> int:
    from .adapters import moe_blocks

    I = int(next(iter(moe_blocks(model).values())).experts.down_proj.shape[-1])
    width = config.graft_width or max(1, I // 2)
    if not 1 <= width <= I:
        raise ValueError(f"--graft-width {width} is out of range: the experts have {I} intermediate channels")
    return width


def prepare(
    config: FlexConfig,
    client: int,
    global_tensors: dict[str, torch.Tensor] | None,
    personal: Personal | None,
) -> tuple[nn.Module, Any, Personal]:
    """The client's model for this round: method's adapters, global tensors, personal parts (grafted now
    if it has none yet)."""
    model, tokenizer = load_model(config)
    grafted = config.method in GRAFTED
    choices: dict[int, list[GraftChoice]] | None = None
    if grafted:
        if personal is not None and "grafts" in personal.meta:
            choices = {int(k): [GraftChoice(**c | {"channels": tuple(c["channels"])}) for c in v]
                       for k, v in personal.meta["grafts"].items()}  # fmt: skip
        else:
            train, _ = data_for(config, client)
            texts = [i.text for i in train[: config.calibration_examples]]
            blocks = pack(texts, tokenizer, config.seq_len)  # (N, T)
            calibration = record_blocks(model, list(blocks.split(config.batch_size)))
            choices = choose_grafts(model, calibration, graft_width(config, model), config.graft_k)
        attach_grafts(model, choices, gated=config.method == "flex", gate_bias=config.gate_bias)
    model = build_trainable(model, config.method, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                            shared=config.shared)  # type: ignore[arg-type]  # fmt: skip
    if grafted:
        enable_grafts(model)
        if personal is not None and personal.tensors:
            load_graft_state(model, personal.tensors)
    if config.method == "local":
        if personal is not None and personal.tensors:
            load_shared(model, personal.tensors)
    elif global_tensors:
        load_shared(model, global_tensors)
    meta: dict[str, Any] = {"client": client, "method": config.method}
    if choices is not None:
        meta["grafts"] = {str(k): [c.to_dict() for c in v] for k, v in choices.items()}
    return model, tokenizer, Personal({}, meta)


@dataclass
class RoundResult:
    shared: dict[str, torch.Tensor]  # what travels (empty for local)
    personal: Personal
    num_examples: int
    metrics: dict[str, float]
    model: nn.Module | None = None  # the trained model (for inspection; the ClientApp drops it)


def train_round(
    config: FlexConfig,
    client: int,
    server_round: int,
    global_tensors: dict[str, torch.Tensor] | None,
    personal: Personal | None,
) -> RoundResult:
    start = time.perf_counter()
    model, tokenizer, fresh = prepare(config, client, global_tensors, personal)
    train, _ = data_for(config, client)
    blocks = pack([i.text for i in train], tokenizer, config.seq_len)  # (N, T)
    batch_size = min(config.batch_size, blocks.shape[0])
    batches = BatchIterator(blocks, batch_size, seed=config.seed * 100_003 + server_round * 101 + client)
    tc = TrainConfig(steps=config.local_steps, batch_size=batch_size, seq_len=config.seq_len, lr=config.lr,
                     warmup=0, weight_decay=0.0, eval_batches=1, seed=config.seed, device=config.device)  # fmt: skip
    lr_scales = {n: config.graft_lr / config.lr for n, p in model.named_parameters()
                 if p.requires_grad and ".flex_graft." in n}  # fmt: skip
    handles = []
    if config.method == "fedprox" and global_tensors:
        params = shared_params(model)
        handles = add_proximal_term(params, global_tensors, config.prox_mu)
    torch.manual_seed(config.seed + server_round)
    result = Trainer(model, tc, batches, lr_scales=lr_scales).run()
    for h in handles:
        h.remove()
    shared = shared_state(model)
    fresh.meta["round"] = server_round
    if config.method in GRAFTED:
        fresh.tensors = graft_state(model)
    elif config.method == "local":
        fresh.tensors = shared
    metrics = {
        "train-loss": float(result.train_loss if result.train_loss is not None else math.nan),
        "train-seconds": time.perf_counter() - start,
        "trainable-parameters": float(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "shared-parameters": float(sum(t.numel() for t in shared.values())),
    }
    if "grafts" in fresh.meta:
        chosen = [c for cs in fresh.meta["grafts"].values() for c in cs]
        metrics["graft-error"] = sum(c["pruned_error"] for c in chosen) / len(chosen)
    travels = {} if config.method == "local" else shared
    return RoundResult(travels, fresh, tc.steps * batch_size, metrics, model)


def evaluate(
    config: FlexConfig, client: int, global_tensors: dict[str, torch.Tensor] | None, personal: Personal | None
) -> dict[str, float]:
    """ROUGE-L on the client's held-out instructions, general-corpus held-out loss, expert activation std."""
    model, tokenizer, _ = prepare(config, client, global_tensors, personal)
    if config.method in GRAFTED and personal is None:
        raise ValueError(f"client {client} has no personal parts to evaluate (it never trained)")
    merge = getattr(model, "merge_and_unload", None)
    if merge is not None:
        # Same function, and far faster: PEFT recomputes an expert LoRA's delta on every forward.
        model = merge()
    _, held = data_for(config, client)
    top_k = int(getattr(model.config, "num_experts_per_tok", 2))
    load = ExpertLoad(model, top_k)
    try:
        predictions = greedy_generate(model, tokenizer, [i.prompt for i in held], config.max_new_tokens)
    finally:
        load.close()
    blocks = retention_blocks(config.model, config.retention_data, config.seq_len, config.retention_blocks, config.seed)
    return {
        "rouge-l": rouge_l(predictions, [i.response for i in held]),
        "retention-loss": heldout_loss(model, blocks, batch_size=config.batch_size),
        "expert-std": load.std(),
        "heldout-examples": float(len(held)),
    }


def frozen_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every pretrained expert and router tensor (tests check they never change)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in frozen_names(model)}
