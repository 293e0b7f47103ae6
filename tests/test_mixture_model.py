"""FlexMoReForCausalLM against stock transformers FlexOlmo, its naive path, and its own checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, FlexOlmoConfig, FlexOlmoForCausalLM

from flexmore.mixture import (
    ExpertParts,
    FlexMoReConfig,
    FlexMoReForCausalLM,
    compose_low_rank,
    from_flexolmo,
    gather_offloaded_experts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

H, I, L, V = 64, 96, 2, 128
PROJ_SHAPES = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}


def flexolmo_config(num_experts: int, top_k: int) -> FlexOlmoConfig:
    return FlexOlmoConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-scale weights (stock init N(0, 0.02) makes every logit ~0 and every routing flat)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.normal_(0.0, 1.0, generator=gen)  # routing spreads over experts
        elif name.endswith("mlp.gate.bias"):
            p.normal_(-0.5, 1.0, generator=gen)
        elif p.dim() >= 2:
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return model.eval()


def factors(rank: int, seed: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(L):
        for proj, (d_out, d_in) in PROJ_SHAPES.items():
            A = torch.randn(rank, d_in, generator=gen) * rank**-0.5  # (r, d_in)
            B = torch.randn(d_out, rank, generator=gen) * 0.5 * d_in**-0.5  # (d_out, r)
            out[(layer, proj)] = (A, B)
    return out


def low_rank(name: str, rank: int, seed: int, base: int = 0) -> ExpertParts:
    router = torch.randn(L, H, generator=torch.Generator().manual_seed(seed + 100))  # (L, H)
    return ExpertParts(name=name, router=router, factors=factors(rank, seed), base=base)


def public_model(top_k: int = 2) -> FlexOlmoForCausalLM:
    torch.manual_seed(0)
    return randomize(FlexOlmoForCausalLM(flexolmo_config(1, 1)), seed=1)


def hetero(ranks: tuple[int, ...] = (3, 17, 64), top_k: int = 2) -> FlexMoReForCausalLM:
    experts = [low_rank(f"domain_{i}", r, seed=10 + i) for i, r in enumerate(ranks)]
    return compose_low_rank(public_model(), experts, top_k=top_k).eval()


def tokens(batch: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_all_full_equals_stock_flexolmo(top_k: int) -> None:
    torch.manual_seed(0)
    stock = randomize(FlexOlmoForCausalLM(flexolmo_config(4, top_k)), seed=3)
    ours = from_flexolmo(stock)
    assert ours.config.expert_ranks == [None] * 4
    ids = tokens()
    used = torch.topk(stock.model.layers[0].mlp.gate.weight @ stock.model.embed_tokens(ids).reshape(-1, H).T, 1, 0)
    assert used.indices.unique().numel() > 1  # routing is not trivial
    ref, got = logits(stock, ids), logits(ours, ids)
    assert ref.abs().max() > 1.0  # real magnitudes, not a near-zero comparison
    assert (ref - got).abs().max().item() <= 1e-4


def test_hetero_equals_its_dense_export(tmp_path: Path) -> None:
    model = hetero((3, 17, 64), top_k=2)
    assert model.config.expert_ranks == [None, 3, 17, 64]
    model.to_flexolmo().save_pretrained(tmp_path / "dense")
    dense = FlexOlmoForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert dense.config.num_experts == 4
    ids = tokens()
    ref, got = logits(dense, ids), logits(model, ids)
    assert (ref - got).abs().max().item() <= 1e-4
    prompt = tokens(2, 8, seed=1)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    out_ref, out_got = dense.generate(prompt, **kw), model.generate(prompt, **kw)
    assert out_got.shape == (2, 28)
    assert torch.equal(out_ref, out_got)


def chained(top_k: int) -> FlexMoReForCausalLM:
    """Two roots (experts 0 and 3), a chain 2 -> 1 -> 0, and 4 -> 3."""
    cfg = FlexMoReConfig(
        **{k: v for k, v in flexolmo_config(5, top_k).to_dict().items() if k != "model_type"},
        expert_ranks=[None, 3, 17, None, 8],
        expert_bases=[None, 0, 1, None, 3],
    )
    torch.manual_seed(0)
    model = randomize(FlexMoReForCausalLM(cfg), seed=5)
    with torch.no_grad():  # B starts at 0 (LoRA init): make the deltas real
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3 * p.shape[-1] ** -0.5)
    return model


@pytest.mark.parametrize("top_k", [1, 2, 5])
@pytest.mark.parametrize("chunk", [None, 7])
def test_shared_base_equals_naive_with_chain_and_two_roots(top_k: int, chunk: int | None) -> None:
    model = chained(top_k)
    assert model.config.chain(2) == [2, 1] and model.config.root(2) == 0 and model.config.root(4) == 3
    if chunk is not None:  # token chunks of the no-grad path, cut across every expert's token list
        for block in model.moe_blocks():
            block.experts.chunk_tokens = chunk
    ids = tokens(4, 24)
    # Exact by linearity: in float64 the two paths agree to rounding; in float32 to a few ulps of
    # logits of magnitude ~4 (W0 x + B (A x) and (W0 + B A) x round differently).
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 3e-5)):
        model.to(dtype)
        model.set_forward_mode("naive")
        ref = logits(model, ids)
        model.set_forward_mode("shared_base")
        got = logits(model, ids)
        assert ref.dtype == dtype and ref.abs().max() > 1.0
        assert (ref - got).abs().max().item() <= tol, dtype

    def grads(mode: str) -> tuple[float, dict[str, torch.Tensor]]:
        model.set_forward_mode(mode)
        model.zero_grad()
        out = model(ids, labels=ids)  # autograd path of the shared-base forward
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss_naive, g_naive), (loss_shared, g_shared) = grads("naive"), grads("shared_base")
    assert abs(loss_naive - loss_shared) <= 1e-5
    assert g_naive.keys() == g_shared.keys()
    lora = [n for n in g_naive if "lora_" in n]
    assert len(lora) == 2 * 3 * 3 * L  # 3 low-rank experts x 3 projections x (A, B) x layers
    for n in g_naive:
        scale = g_naive[n].abs().max().item()
        assert (g_naive[n] - g_shared[n]).abs().max().item() <= 1e-4 * max(scale, 1e-3), n
    assert max(g_shared[n].abs().max().item() for n in lora) > 0


def test_dense_export_materialises_chains() -> None:
    model = chained(2)
    dense = model.to_flexolmo()
    assert type(dense) is FlexOlmoForCausalLM and dense.config.num_experts == 5
    I_ = model.config.intermediate_size
    ex = model.model.layers[1].mlp.experts
    lr1, lr2 = ex.low_rank["1"], ex.low_rank["2"]
    want = ex.gate_up_proj[0, :I_] + lr1.gate_proj.delta() + lr2.gate_proj.delta()  # expert 2 = W0 + d1 + d2
    assert torch.allclose(dense.model.layers[1].mlp.experts.gate_up_proj[2, :I_], want, atol=1e-6)
    ids = tokens()
    assert (logits(dense, ids) - logits(model, ids)).abs().max().item() <= 1e-4


def test_save_load_round_trip_bit_identical(tmp_path: Path) -> None:
    import flexmore.mixture  # noqa: F401  registers model_type "flexmore" with the Auto classes

    experts = [low_rank("math", 3, 20), low_rank("code", 17, 21), low_rank("news", 5, 22, base=1)]
    model = compose_low_rank(public_model(), experts, top_k=2).eval()
    assert model.config.expert_bases == [None, 0, 0, 1]
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "flexmore"
    assert cfg["expert_ranks"] == [None, 3, 17, 5] and cfg["expert_names"] == ["public", "math", "code", "news"]
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        on_disk = set(f.keys())
    assert on_disk == set(model.state_dict())  # no conversion mapping renamed or split anything
    assert "model.layers.1.mlp.experts.low_rank.3.down_proj.lora_B" in on_disk

    for loader in (FlexMoReForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path / "m").eval()
        assert type(loaded) is FlexMoReForCausalLM
        ref, got = model.state_dict(), loaded.state_dict()
        assert ref.keys() == got.keys()
        for k in ref:
            assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
    prompt = tokens(2, 6, seed=2)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(loaded.generate(prompt, **kw), model.generate(prompt, **kw))

    half = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    assert half.model.layers[0].mlp.experts.low_rank["1"].gate_proj.lora_A.dtype == torch.bfloat16
    diff = (logits(half, tokens()).float() - logits(model, tokens())).abs().max().item()
    assert diff < 0.5  # bf16 forward runs and stays close


def test_router_bias_and_active_experts_persist(tmp_path: Path) -> None:
    model = chained(2)
    cfg = model.config.to_dict() | {"router_bias": True, "active_experts": ["expert_0", "expert_2", "expert_4"]}
    cfg.pop("model_type")
    biased = randomize(FlexMoReForCausalLM(FlexMoReConfig(**cfg)), seed=9)  # bias ~ N(-0.5, 1)
    gate = biased.model.layers[0].mlp.gate
    x = torch.randn(6, H)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([-3.0, 0.7, -0.4, 1.5, -1.0]))
        logits_, _, _ = gate(x)
    want = x @ gate.weight.T + torch.tensor([0.0, 0.0, -0.4, 0.0, -1.0])  # min(b, 0), never on expert 0
    want[:, [1, 3]] = float("-inf")  # opted out
    assert torch.allclose(logits_, want, atol=1e-5)
    biased.save_pretrained(tmp_path / "b")
    loaded = FlexMoReForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert loaded.config.active_experts == ["expert_0", "expert_2", "expert_4"]
    assert loaded.model.layers[0].mlp.gate.bias.shape == (5,)
    ids = tokens()
    assert torch.equal(logits(loaded, ids), logits(biased, ids))
    _, _, index = loaded.model.layers[0].mlp.gate(loaded.model.embed_tokens(ids))
    assert set(index.unique().tolist()) <= {0, 2, 4}
    with pytest.raises(ValueError, match="router_bias"):
        loaded.to_flexolmo()


def test_opt_out_equals_mixture_without_the_expert() -> None:
    full = hetero((3, 17, 64), top_k=2)
    public = public_model()
    without = compose_low_rank(public, [low_rank("domain_0", 3, 10), low_rank("domain_2", 64, 12)], top_k=2).eval()
    ids = tokens()
    before = logits(full, ids)
    full.set_active_experts(["public", "domain_0", "domain_2"])
    masked = logits(full, ids)
    assert (masked - logits(without, ids)).abs().max().item() <= 1e-5
    assert (masked - before).abs().max().item() > 1e-2  # expert domain_1 mattered
    # Fewer active experts than top_k: exactly the public model alone.
    full.set_active_experts(["public"])
    assert (logits(full, ids) - logits(public, ids)).abs().max().item() <= 1e-5
    full.set_active_experts(None)
    assert torch.equal(logits(full, ids), before)
    with pytest.raises(ValueError, match="active_experts"):
        full.set_active_experts(["public", "nope"])


OFFLOAD_LAYER_1 = {  # layer 1 on disk, the rest in memory: accelerate loads layer 1 around its forward
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def test_device_map_with_disk_offload_equals_in_memory(tmp_path: Path) -> None:
    from accelerate import dispatch_model

    model = hetero((3, 17, 64), top_k=3)
    ids = tokens()
    ref = logits(model, ids)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", device_map=OFFLOAD_LAYER_1, offload_folder=str(tmp_path / "offload")
    ).eval()
    factor = loaded.model.layers[1].mlp.experts.low_rank["2"].down_proj.lora_B
    assert factor.is_meta  # really offloaded
    assert torch.equal(logits(loaded, ids), ref)
    assert factor.is_meta  # and given back after the forward
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(ids[:1, :5], **kw), model.generate(ids[:1, :5], **kw))

    # accelerate on its own hooks each LoRAFactors module, whose forward the shared-base path never calls:
    # a clear error, not garbage, until the hooks are gathered onto FlexMoReExperts.
    dispatched = dispatch_model(hetero((3, 17, 64), top_k=3), OFFLOAD_LAYER_1, offload_dir=str(tmp_path / "d"))
    with pytest.raises(RuntimeError, match="low-rank expert weights are on the meta device"):
        logits(dispatched, ids)
    gather_offloaded_experts(dispatched)
    assert torch.equal(logits(dispatched, ids), ref)

    # Finer than a layer (below _no_split_modules): not gathered, but refused rather than wrong.
    finer = {**OFFLOAD_LAYER_1, "model.layers.1": "cpu", "model.layers.1.mlp.experts.low_rank.2": "disk"}
    dispatched = dispatch_model(hetero((3, 17, 64), top_k=3), finer, offload_dir=str(tmp_path / "d2"))
    gather_offloaded_experts(dispatched)
    with pytest.raises(RuntimeError, match="low-rank expert weights are on the meta device"):
        logits(dispatched, ids)


def _base_kwargs(E: int = 3) -> dict:
    return {k: v for k, v in flexolmo_config(E, 2).to_dict().items() if k != "model_type"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"expert_ranks": [None, 0, 4]}, "expert_ranks"),
        ({"expert_ranks": [None, 65, 4]}, "expert_ranks"),  # > min(hidden, intermediate) = 64
        ({"expert_ranks": [None, 4]}, "expert_ranks"),  # wrong length
        ({"expert_ranks": [4, 4, 4], "expert_bases": [1, 2, 0]}, "expert_ranks"),  # no full expert
        ({"expert_ranks": [None, 4, 4], "expert_bases": [None, 2, 1]}, "expert_bases"),  # cycle
        ({"expert_ranks": [None, 4, 4], "expert_bases": [None, 1, 0]}, "expert_bases"),  # on itself
        ({"expert_ranks": [None, 4, 4], "expert_bases": [None, None, 0]}, "expert_bases"),  # chain never ends
        ({"expert_ranks": [None, None, 4], "expert_bases": [None, 0, 0]}, "expert_bases"),  # full with a base
        ({"expert_names": ["a", "b", "a"]}, "expert_names"),
        ({"active_experts": ["expert_0", "math"]}, "active_experts"),
    ],
)
def test_config_validation_names_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FlexMoReConfig(**_base_kwargs(), **fields)


def test_config_defaults() -> None:
    cfg = FlexMoReConfig(**_base_kwargs(), expert_ranks=[None, 4, 8])
    assert cfg.expert_names == ["expert_0", "expert_1", "expert_2"]
    assert cfg.expert_bases == [None, 0, 0] and cfg.full_experts == [0] and cfg.chain(2) == [2]


def test_meta_parameter_counts_7x7b() -> None:
    full, per_rank = 4_328_521_728, 1_449_984
    ranks = [None, 64, 128, 2048, 1, 8, 128]
    with torch.device("meta"):
        model = FlexMoReForCausalLM(FlexMoReConfig(expert_ranks=ranks))
        stock = FlexOlmoForCausalLM(FlexOlmoConfig())
        all_full = FlexMoReForCausalLM(FlexMoReConfig())
    total = sum(p.numel() for p in model.parameters())
    assert total == 10_746_146_816 == 2_971_013_120 + full + sum(r for r in ranks if r) * per_rank
    non_expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." not in n)
    assert non_expert == 2_971_013_120
    assert sum(p.numel() for p in all_full.parameters()) == 33_270_665_216
    assert sum(p.numel() for p in stock.parameters()) == 33_270_665_216
    assert math.isclose(total / 33_270_665_216, 0.323, abs_tol=1e-3)
