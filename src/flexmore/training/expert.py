"""Train one domain expert in isolation against the frozen public model (the FlexOlmo recipe).

Upcycle the public model to two experts, [public, new]: the new expert starts as a copy of the public
FFN (full variant) or as `W_public + B A` with B = 0 (low-rank variant, rank R; A ~ N(0, 1/d_in), so
training starts exactly at the public model, as LoRA). Its router row starts from the mean MoE input of
a sample of the owner's documents (`training.router`; row 0 stays the public model's). Everything else
is frozen; top-2 of 2 is trained on the owner's data only. Before any step the upcycled model computes
the public model's function (two equal experts whose weights sum to 1, or B = 0), so the step-0
held-out loss is the public model's.

The router row trains at `router_lr_ratio` (default 0.01) of the expert's lr. At the full lr, Adam
rewrites the small data-informed row within 80 steps (cosine to its init -0.5..0.5): the 2-expert model
does not mind, but composed with the other experts the rows no longer separate the domains and a
5-expert mixture (top-2) was 0.5-0.7 nats worse than the public model; at 0.01 it matches a frozen row
and beats the public model on 3 of 4 embedded domains.

The router (E, H) is one tensor: row 0 is frozen with a gradient mask, and decoupled weight decay is
applied through the same mask (`training.loop`), so row 0 stays bit-identical; the same holds for the
public slice of the fused expert tensors in the full variant.

Outputs: full -> a 2-expert FlexOlmo checkpoint (`compose --expert NAME=DIR#1`, `extract`);
low-rank -> an expert folder (docs/formats.md; `compose --expert NAME=DIR[@r]`), whose factors are the
trained `B A` re-factorised by SVD (`svd: "trained"`), so every prefix rank is its best truncation.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, FlexOlmoConfig, FlexOlmoForCausalLM

from flexmore.lowrank.expert import WEIGHTS, ExpertMeta, energy_profile, factor_key, router_bias_key, router_key
from flexmore.storage import (
    PROJECTIONS,
    FlexOlmoCheckpoint,
    StreamingSafetensorsWriter,
    atomic_dir,
    atomic_write_text,
    fingerprint,
    public_digest,
    resolve_source,
)
from flexmore.training.data import BatchIterator, load_texts, pack, split_heldout
from flexmore.training.data import fingerprint as data_fingerprint
from flexmore.training.loop import RESULT_FILE, TrainConfig, Trainer, TrainResult, TrainStatus, checkpoint_dir_for
from flexmore.training.router import ROUTER_SCALE, EmbedFn, domain_router_rows, moe_blocks, router_sample

PUBLIC, NEW = 0, 1  # expert indices in the upcycled model
ROUTER_LR_RATIO = 0.01  # see ExpertTrainConfig.router_lr_ratio


def default_expert_train(rank: int | None = None) -> TrainConfig:
    """~330k tokens of the owner's data, ~30 s on 2 idle CPU cores at the default public size. Low-rank
    experts take a higher peak lr (as LoRA usually does); both were the best of {2e-3, 5e-3, 1e-2} on
    the embedded `facts` domain."""
    lr = 5e-3 if rank is None else 1e-2
    return TrainConfig(steps=80, batch_size=16, seq_len=256, lr=lr, warmup=8, eval_every=40, eval_batches=16)


@dataclass(frozen=True)
class ExpertTrainConfig:
    public: str  # the public FlexOlmo checkpoint (folder or hub id)
    data: str  # the owner's documents: any `load_texts` source
    out: Path
    name: str | None = None  # default: from the data source ("embedded:math" -> "math")
    rank: int | None = None  # None: full expert; R: low-rank from scratch
    public_expert: int = 0  # which expert of the public checkpoint is the public FFN
    train: TrainConfig = None  # type: ignore[assignment]  # None: default_expert_train(rank)
    heldout_fraction: float = 0.05
    text_field: str = "text"
    max_docs: int | None = None
    router_docs: int = 256  # owner documents whose mean MoE input initialises the router row
    router_scale: float = ROUTER_SCALE
    # The router row's peak lr as a fraction of the expert's; 0 keeps the data-informed row as initialised.
    router_lr_ratio: float = ROUTER_LR_RATIO
    router_bias: bool = False  # original FlexOlmo's learnable non-positive bias (FlexMoRe model only)
    overwrite: bool = False

    def __post_init__(self) -> None:
        owner = "ExpertTrainConfig"
        if self.train is None:
            object.__setattr__(self, "train", default_expert_train(self.rank))  # frozen: set once, here
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"{owner}.train must be a TrainConfig, got {type(self.train).__name__}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"{owner}.rank must be a positive int or None (full), got {self.rank!r}")
        if isinstance(self.public_expert, bool) or not isinstance(self.public_expert, int) or self.public_expert < 0:
            raise ValueError(f"{owner}.public_expert must be a non-negative int, got {self.public_expert!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"{owner}.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        if isinstance(self.router_docs, bool) or not isinstance(self.router_docs, int) or self.router_docs < 1:
            raise ValueError(f"{owner}.router_docs must be a positive int, got {self.router_docs!r}")
        scale = self.router_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{owner}.router_scale must be a positive number, got {self.router_scale!r}")
        ratio = self.router_lr_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not (math.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"{owner}.router_lr_ratio must be a non-negative number, got {ratio!r}")
        if self.max_docs is not None and self.max_docs < 2:
            raise ValueError(f"{owner}.max_docs must be >= 2 or None, got {self.max_docs!r}")
        if not self.expert_name or any(c in self.expert_name for c in "/\\=@#"):
            raise ValueError(f"{owner}.name must be non-empty without / \\ = @ #, got {self.expert_name!r}")

    @property
    def expert_name(self) -> str:
        if self.name is not None:
            return self.name
        text = self.data.split(":", 1)[1] if self.data.startswith("embedded:") else Path(self.data).stem
        return text or "expert"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"out": str(self.out), "name": self.expert_name}


@dataclass
class ExpertResult:
    out: Path
    name: str
    rank: int | None
    trainable_parameters: int
    public_loss: float  # held-out loss of the public model on the owner's held-out documents
    expert_loss: float  # the same, of the trained public + expert mixture (top-2 of 2)
    train: TrainResult
    seconds: float
    # In memory only: the training-time model, and the router rows (L, H) it started from.
    model: nn.Module | None = field(default=None, repr=False)
    router_init: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        # Not asdict(self): it would deep-copy the model first.
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "router_init")}
        return d | {"out": str(self.out), "train": asdict(self.train)}


# ---------------------------------------------------------------- building the two-expert model


def _public_tensors(public: FlexOlmoForCausalLM, e: int) -> tuple[dict[str, torch.Tensor], list[tuple[Any, ...]]]:
    """Non-expert tensors (routers excepted) and, per layer, (gate_up (2I, H), down (H, I), router row (H,))."""
    if not 0 <= e < public.config.num_experts:
        raise ValueError(f"public_expert {e} out of range: the public model has {public.config.num_experts} experts")
    state = {k: v for k, v in public.state_dict().items() if ".mlp." not in k}
    layers = [
        (b.experts.gate_up_proj[e].detach(), b.experts.down_proj[e].detach(), b.gate.weight[e].detach())
        for b in moe_blocks(public)
    ]
    return state, layers


def _expert_config_dict(public: FlexOlmoForCausalLM) -> dict[str, Any]:
    cfg = public.config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    return cfg | {"num_experts": 2, "num_experts_per_tok": 2}


def upcycle_full(public: FlexOlmoForCausalLM, rows: torch.Tensor, public_expert: int = 0) -> FlexOlmoForCausalLM:
    """A 2-expert FlexOlmo [public, copy of public] with router rows [public row, rows[L]] (rows (L, H))."""
    state, layers = _public_tensors(public, public_expert)
    model = FlexOlmoForCausalLM(FlexOlmoConfig(**_expert_config_dict(public)))
    for L, (gate_up, down, row) in enumerate(layers):
        p = f"model.layers.{L}.mlp"
        state[f"{p}.experts.gate_up_proj"] = torch.stack([gate_up, gate_up])  # (2, 2I, H)
        state[f"{p}.experts.down_proj"] = torch.stack([down, down])  # (2, H, I)
        state[f"{p}.gate.weight"] = torch.stack([row, rows[L].to(row.dtype)])  # (2, H)
    model.load_state_dict(state, strict=True)
    return model


def upcycle_low_rank(
    public: FlexOlmoForCausalLM,
    rows: torch.Tensor,
    rank: int,
    *,
    name: str,
    public_expert: int = 0,
    router_bias: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A FlexMoReForCausalLM [public (full), name (rank R on public)], B = 0 and A ~ N(0, 1/d_in)."""
    from flexmore.mixture.config import FlexMoReConfig
    from flexmore.mixture.modeling import FlexMoReForCausalLM

    state, layers = _public_tensors(public, public_expert)
    config = FlexMoReConfig(
        **_expert_config_dict(public),
        expert_ranks=[None, rank],
        expert_names=["public", name],
        expert_bases=[None, PUBLIC],
        router_bias=router_bias,
    )
    model = FlexMoReForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    for L, (gate_up, down, row) in enumerate(layers):
        p = f"model.layers.{L}.mlp"
        state[f"{p}.experts.gate_up_proj"] = gate_up[None]  # (1, 2I, H)
        state[f"{p}.experts.down_proj"] = down[None]  # (1, H, I)
        state[f"{p}.gate.weight"] = torch.stack([row, rows[L].to(row.dtype)])  # (2, H)
        if router_bias:
            state[f"{p}.gate.bias"] = torch.zeros(2)  # (2,)
        for proj in PROJECTIONS:
            d_out, d_in = down.shape if proj == "down_proj" else (gate_up.shape[0] // 2, gate_up.shape[1])
            # A: unit-variance outputs for unit-variance inputs; B = 0: the expert starts at the public one.
            A = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)  # (r, d_in)
            state[f"{p}.experts.low_rank.{NEW}.{proj}.lora_A"] = A
            state[f"{p}.experts.low_rank.{NEW}.{proj}.lora_B"] = torch.zeros(d_out, rank)
    model.load_state_dict(state, strict=True)
    return model


def freeze_all_but_new_expert(model: nn.Module, low_rank: bool, train_router: bool = True) -> dict[str, torch.Tensor]:
    """requires_grad only on the new expert and (if train_router) its router row; the router bias, if
    any, is always trained. Returns the masks of the tensors shared with frozen parts (True =
    trainable), for `Trainer(masks=...)`."""
    for p in model.parameters():
        p.requires_grad_(False)
    masks: dict[str, torch.Tensor] = {}
    row = torch.tensor([False, True])
    for L, block in enumerate(moe_blocks(model)):
        prefix = f"model.layers.{L}.mlp"
        if train_router:
            block.gate.weight.requires_grad_(True)
            masks[f"{prefix}.gate.weight"] = row[:, None]  # (2, 1): row NEW only
        if getattr(block.gate, "bias", None) is not None:
            block.gate.bias.requires_grad_(True)
            masks[f"{prefix}.gate.bias"] = row  # (2,)
        if low_rank:
            for param in block.experts.low_rank[str(NEW)].parameters():
                param.requires_grad_(True)
        else:
            block.experts.gate_up_proj.requires_grad_(True)
            block.experts.down_proj.requires_grad_(True)
            masks[f"{prefix}.experts.gate_up_proj"] = row[:, None, None]  # (2, 1, 1): expert NEW only
            masks[f"{prefix}.experts.down_proj"] = row[:, None, None]
    return masks


def load_public(source: str) -> tuple[FlexOlmoForCausalLM, Any, Path]:
    folder = resolve_source(source)
    model = FlexOlmoForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no eos token")
    return model, tokenizer, folder


# ---------------------------------------------------------------- training


def _check_against_public(config: ExpertTrainConfig, public: FlexOlmoForCausalLM) -> None:
    if config.router_bias and config.rank is None:
        raise ValueError(
            "ExpertTrainConfig.router_bias needs a low-rank expert (--rank): a FlexOlmo checkpoint has no router bias"
        )
    limit = min(public.config.hidden_size, public.config.intermediate_size)
    if config.rank is not None and config.rank > limit:
        raise ValueError(f"ExpertTrainConfig.rank must be <= min(hidden, intermediate) = {limit}, got {config.rank}")
    if config.train.seq_len > public.config.max_position_embeddings:
        raise ValueError(
            f"TrainConfig.seq_len ({config.train.seq_len}) exceeds the public model's max_position_embeddings "
            f"({public.config.max_position_embeddings})"
        )


def build_expert_model(
    config: ExpertTrainConfig,
    public: FlexOlmoForCausalLM,
    tokenizer: Any,
    router_docs: list[str],
    embed: EmbedFn | None = None,
) -> tuple[nn.Module, torch.Tensor]:
    """The upcycled [public, new] model on config.train.device, and the new router rows (L, H) it starts from."""
    device = config.train.device
    nn.Module.to(public, device)
    rows = domain_router_rows(public, tokenizer, router_docs, scale=config.router_scale, embed=embed, device=device)
    nn.Module.to(public, "cpu")
    rows = rows.cpu()
    if config.rank is None:
        model: nn.Module = upcycle_full(public, rows, config.public_expert)
    else:
        model = upcycle_low_rank(
            public, rows, config.rank, name=config.expert_name, public_expert=config.public_expert,
            router_bias=config.router_bias, seed=config.train.seed,
        )  # fmt: skip
    return model.to(device), rows


def train_expert(
    config: ExpertTrainConfig,
    progress: Callable[[TrainStatus], None] | None = None,
    *,
    embed: EmbedFn | None = None,
    resume: bool = True,
) -> ExpertResult:
    """Train the expert and write it to `config.out` (atomically); resume from its checkpoint folder if
    `resume` and one exists. `embed`: initialise the router row from this embedding function's mean
    embedding instead of the public model's hidden states."""
    start = time.perf_counter()
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    tc = config.train
    public, tokenizer, folder = load_public(config.public)
    _check_against_public(config, public)
    docs = load_texts(config.data, config.text_field, max_docs=config.max_docs)
    train_docs, held_docs = split_heldout(docs, config.heldout_fraction, seed=tc.seed)
    blocks = pack(train_docs, tokenizer, tc.seq_len)  # (N, T)
    heldout = pack(held_docs, tokenizer, tc.seq_len)  # (M, T)
    sample = router_sample(train_docs, config.router_docs, tc.seed)
    model, rows = build_expert_model(config, public, tokenizer, sample, embed)
    del public
    masks = freeze_all_but_new_expert(model, low_rank=config.rank is not None, train_router=config.router_lr_ratio > 0)
    router_lr = {n: config.router_lr_ratio for n in masks if n.endswith(".mlp.gate.weight")}

    ckpt = checkpoint_dir_for(out)
    batches = BatchIterator(blocks, tc.batch_size, seed=tc.seed)
    keep = ckpt if tc.checkpoint_every else None
    trainer = Trainer(model, tc, batches, heldout, masks=masks, lr_scales=router_lr, checkpoint_dir=keep)
    if resume and (ckpt / "trainer.json").is_file():
        trainer.load_checkpoint(ckpt)
    if trainer.step == 0:
        trainer.evaluate()  # step 0: the public model's loss (see the module docstring)
    result = trainer.run(progress=progress)

    report = ExpertResult(
        out=out,
        name=config.expert_name,
        rank=config.rank,
        trainable_parameters=sum(
            int(masks[n].expand_as(p).sum()) if n in masks else p.numel()
            for n, p in model.named_parameters()
            if p.requires_grad
        ),
        public_loss=float(result.history[0]["eval_loss"]),  # type: ignore[arg-type]
        expert_loss=float(result.eval_loss),  # type: ignore[arg-type]
        train=result,
        seconds=0.0,
        model=model,
        router_init=rows,
    )
    model.to("cpu").eval()
    with atomic_dir(out, config.overwrite) as tmp:
        if config.rank is None:
            model.save_pretrained(tmp)  # type: ignore[operator]
            tokenizer.save_pretrained(tmp)
        else:
            write_expert_folder(model, tmp, name=config.expert_name, rank=config.rank, source=config.data,
                                public=folder, public_expert=config.public_expert)  # fmt: skip
        report.seconds = time.perf_counter() - start
        meta = {
            "kind": "expert",
            "config": config.to_dict(),
            "public": str(folder),
            "result": report.to_dict(),
            "data": {"source": config.data, "sha256": data_fingerprint(train_docs), "heldout_docs": len(held_docs)},
        }
        atomic_write_text(tmp / RESULT_FILE, json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)  # the artefact is complete: its checkpoints are spent
    return report


# ---------------------------------------------------------------- the low-rank expert folder


def refactorize(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`B A` as PHLoRA factors ordered by singular value: (A' (r, d_in), B' (d_out, r), S (r,)) with
    B' A' = B A, B' = U sqrt(S), A' = sqrt(S) V^T. Through QR of both factors: an r x r SVD, never d_out x d_in."""
    Qb, Rb = torch.linalg.qr(B.double())  # (d_out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (d_in, r), (r, r)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # (r, r), (r,), (r, r)
    root = S.sqrt()  # (r,)
    B2 = (Qb @ U) * root[None, :]  # (d_out, r)
    A2 = root[:, None] * (Vh @ Qa.T)  # (r, d_in)
    return A2.float(), B2.float(), S


def write_expert_folder(
    model: nn.Module, folder: Path, *, name: str, rank: int, source: str, public: Path, public_expert: int = 0
) -> ExpertMeta:
    """Write the trained low-rank expert NEW of `model` as `expert.safetensors` + `expert.json` in `folder`."""
    config: Any = model.config
    tensors: dict[str, torch.Tensor] = {}
    for L, block in enumerate(moe_blocks(model)):
        expert = block.experts.low_rank[str(NEW)]
        for proj in PROJECTIONS:
            factors = getattr(expert, proj)
            tensors[factor_key(L, proj, "lora_A")] = factors.lora_A.detach()  # (r, d_in)
            tensors[factor_key(L, proj, "lora_B")] = factors.lora_B.detach()  # (d_out, r)
        tensors[router_key(L)] = block.gate.weight[NEW].detach()  # (H,)
        if getattr(block.gate, "bias", None) is not None:  # the learnt non-positive bias, stored as min(b, 0)
            tensors[router_bias_key(L)] = block.gate.bias[NEW].detach().clamp(max=0)
    dims = (config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    digest = public_digest(FlexOlmoCheckpoint(public), public_expert)
    return write_trained_expert(folder, tensors, name=name, source=source, dims=dims, rank=rank, digest=digest,
                                public_expert=public_expert)  # fmt: skip


def write_trained_expert(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    name: str,
    source: str,
    dims: tuple[int, int, int],
    rank: int,
    digest: dict[str, str],
    public_expert: int = 0,
) -> ExpertMeta:
    """The expert folder format from trained factors and router rows keyed as in it (`router_bias` too,
    when present). Factors are re-ordered by singular value here, whatever the trainer produced, so every
    prefix rank is the best truncation of the product (B' A' = B A exactly)."""
    num_layers, H, I = dims
    meta = ExpertMeta(
        name=name,
        source=source,
        public_expert=public_expert,
        expert_index=NEW,
        num_layers=num_layers,
        hidden_size=H,
        intermediate_size=I,
        max_rank=rank,
        dtype="float32",
        svd="trained",
        shapes={p: [H, I] if p == "down_proj" else [I, H] for p in PROJECTIONS},
        public_digest=digest,
        public_sha256=fingerprint(digest),
    )
    specs = meta.tensor_specs(torch.float32)
    biased = router_bias_key(0) in tensors
    if biased:
        specs |= {router_bias_key(L): (torch.float32, ()) for L in range(num_layers)}
    with StreamingSafetensorsWriter(folder / WEIGHTS, specs, {"format": "flexmore-expert"}) as w:
        for L in range(num_layers):
            for proj in PROJECTIONS:
                A, B, S = refactorize(tensors[factor_key(L, proj, "lora_A")], tensors[factor_key(L, proj, "lora_B")])
                w.write(factor_key(L, proj, "lora_A"), A.contiguous())  # (r, d_in)
                w.write(factor_key(L, proj, "lora_B"), B.contiguous())  # (d_out, r)
                meta.matrices[f"layers.{L}.{proj}"] = energy_profile(S, rank)
            w.write(router_key(L), tensors[router_key(L)].float().contiguous())  # (H,)
        if biased:
            for L in range(num_layers):
                w.write(router_bias_key(L), tensors[router_bias_key(L)].float().reshape(()).contiguous())
    meta.save(folder)
    return meta
