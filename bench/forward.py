"""Forward speed of FlexMoRE's shared-base MoE against stock FlexOlmo, measured side by side.

Prefill (batch x prompt tokens, logits of the last position only, as `generate` does) and one-token
decode (batch, KV cache of `prompt` tokens) for:
  stock     transformers FlexOlmoForCausalLM, 7 full experts
  flexmore  1 full public expert + 6 low-rank experts (paper's MC9 ranks scaled by min(H, I) / 4096)
  naive     the same FlexMoRE, materialising W_public + B A per routed expert each forward
  floor     FlexOlmo with the public expert alone (1 expert, top-1): the cheapest possible model
All share the non-expert weights, the public expert and the router rows, so routing is the same.

    python bench/forward.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, FlexOlmoConfig, FlexOlmoForCausalLM

from flexmore.mixture import ExpertParts, FlexMoReForCausalLM, compose_low_rank

PAPER_RANKS = (64, 128, 2048, 1, 8, 128)  # MC9 heterogeneous choice at d = 4096 (paper Table 2)
TOP_KS = (2, 4, 7)


def config(quick: bool, num_experts: int, top_k: int) -> FlexOlmoConfig:
    dims = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8)
    if not quick:
        dims = dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16)
    return FlexOlmoConfig(
        vocab_size=8192,
        max_position_embeddings=1024,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
        **dims,
    )


@torch.no_grad()
def build(quick: bool, seed: int = 0) -> tuple[FlexOlmoForCausalLM, FlexOlmoForCausalLM, FlexMoReForCausalLM]:
    torch.manual_seed(seed)
    stock = FlexOlmoForCausalLM(config(quick, 7, 7)).eval()
    H, I, L = stock.config.hidden_size, stock.config.intermediate_size, stock.config.num_hidden_layers
    gen = torch.Generator().manual_seed(seed + 1)
    for block in (layer.mlp for layer in stock.model.layers):
        # Stock init N(0, 0.02) routes almost uniformly; unit-variance logits spread tokens over experts.
        block.gate.weight.normal_(0.0, H**-0.5, generator=gen)
    floor = FlexOlmoForCausalLM(config(quick, 1, 1)).eval()
    state = stock.state_dict()
    for k in list(state):
        if k.endswith(("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")):
            state[k] = state[k][:1]  # the public expert and its router row
    floor.load_state_dict(state)
    ranks = [max(1, round(r * min(H, I) / 4096)) for r in PAPER_RANKS]
    experts = []
    for e, r in enumerate(ranks, start=1):
        factors = {}
        for layer in range(L):
            for proj, (d_out, d_in) in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
                A = torch.randn(r, d_in, generator=gen) * d_in**-0.5  # (r, d_in)
                B = torch.randn(d_out, r, generator=gen) * 0.02  # (d_out, r)
                factors[(layer, proj)] = (A, B)
        router = torch.stack([layer.mlp.gate.weight[e] for layer in stock.model.layers])  # (L, H)
        experts.append(ExpertParts(name=f"expert_{e}", router=router, factors=factors))
    flexmore = compose_low_rank(floor, experts, top_k=7).eval()
    return stock, floor, flexmore


def set_top_k(model: torch.nn.Module, k: int) -> None:
    if isinstance(model, FlexMoReForCausalLM):
        model.set_top_k(k)
    else:
        for layer in model.model.layers:
            layer.mlp.gate.top_k = k


Variant = tuple[str, int, torch.nn.Module]  # (name, top-k, model)


def prepare(name: str, k: int, model: torch.nn.Module) -> None:
    set_top_k(model, k)
    if isinstance(model, FlexMoReForCausalLM):
        model.set_forward_mode("naive" if name == "naive" else "shared_base")


class MoeClock:
    """Seconds spent inside the models' MoE blocks (router + experts), by forward hooks on every
    `layer.mlp`: the part of the forward that FlexMoRE changes, apart from the attention, norms,
    KV cache and LM head that every variant shares."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.seconds = 0.0
        self._start = 0.0
        for model in models:
            for layer in model.model.layers:
                layer.mlp.register_forward_pre_hook(self._enter)
                layer.mlp.register_forward_hook(self._exit)

    def _enter(self, *_: object) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._start


Timing = tuple[float, float]  # (seconds of the whole forward, seconds inside the MoE blocks)


def interleaved(variants: list[Variant], run: Callable[[int], None], rounds: int, clock: MoeClock) -> list[Timing]:
    """Median seconds of run(i) per variant, whole and in the MoE blocks; every round times each variant
    once, so load from other processes on the machine hits all variants alike instead of whichever ran
    during it."""
    times: list[list[Timing]] = [[] for _ in variants]
    for r in range(rounds + 1):  # round 0 warms up
        for i, (name, k, model) in enumerate(variants):
            prepare(name, k, model)
            clock.seconds = 0.0
            t = time.perf_counter()
            run(i)
            if r > 0:
                times[i].append((time.perf_counter() - t, clock.seconds))
    return [(statistics.median(a for a, _ in t), statistics.median(m for _, m in t)) for t in times]


def measure(variants: list[Variant], prompt: torch.Tensor, repeats: int) -> tuple[list[Timing], list[Timing]]:
    """(prefill, one-token decode) timings per variant at batch prompt.shape[0]."""
    n = prompt.shape[1]
    clock = MoeClock(list({id(m): m for _, _, m in variants}.values()))
    with torch.inference_mode():
        prefill = interleaved(variants, lambda i: variants[i][2](prompt, logits_to_keep=1), repeats, clock)
        caches, steps = [], []
        for name, k, model in variants:
            prepare(name, k, model)
            cache = DynamicCache(config=model.config)
            out = model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
            caches.append(cache)
            steps.append(out.logits[:, -1:].argmax(-1))  # (B, 1)

        def decode(i: int) -> None:
            extra = caches[i].get_seq_length() - n
            if extra > 0:
                caches[i].crop(-extra)  # every repeat decodes the same position on the same cache
            variants[i][2](steps[i], cache=caches[i], use_cache=True)

        decode_s = interleaved(variants, decode, repeats * 3, clock)
    return prefill, decode_s


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight but the input embedding, of which a forward reads only the tokens' rows."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def routing_spread(model: FlexOlmoForCausalLM, prompt: torch.Tensor) -> list[float]:
    """Fraction of top-1 choices per expert in layer 0 (is routing spread, or all on one expert?)."""
    with torch.inference_mode():
        x = model.model.embed_tokens(prompt).reshape(-1, model.config.hidden_size)  # (T, H)
        top1 = (x @ model.model.layers[0].mlp.gate.weight.T).argmax(-1)  # (T,)
    counts = torch.bincount(top1, minlength=model.config.num_experts)
    return [round(c / top1.numel(), 2) for c in counts.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer repeats")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    stock, floor, flexmore = build(args.quick)
    c = flexmore.config
    prompt = torch.randint(1, c.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("stock", stock), ("flexmore", flexmore))}
    print(
        f"model: hidden {c.hidden_size}, intermediate {c.intermediate_size}, {c.num_hidden_layers} layers, "
        f"vocab {c.vocab_size}, 7 experts; FlexMoRE ranks {c.expert_ranks}; threads {torch.get_num_threads()}; "
        f"stock experts implementation {stock.config._experts_implementation!r}\n"
        f"params: stock {params['stock'] / 1e6:.1f}M, flexmore {params['flexmore'] / 1e6:.1f}M; "
        f"prefill {args.batch} x {args.prompt} tokens (last-position logits), decode {args.batch} x 1 "
        f"with a {args.prompt}-token KV cache; median of {repeats} (decode {repeats * 3}) interleaved rounds\n"
        f"layer-0 top-1 routing share per expert (embeddings): {routing_spread(stock, prompt)}\n"
    )
    variants: list[Variant] = [("floor", 1, floor)]
    for k in TOP_KS:
        variants += [("stock", k, stock), ("flexmore", k, flexmore), ("naive", k, flexmore)]
    prefill, decode = measure(variants, prompt, repeats)
    result = {(name, k): (p, d) for (name, k, _), p, d in zip(variants, prefill, decode, strict=True)}
    floor_t = result[("floor", 1)]
    rows = [
        (name, k, result[(name, k)], result[("stock", k)]) for k in TOP_KS for name in ("stock", "flexmore", "naive")
    ]
    rows.append(("floor", 1, floor_t, floor_t))
    tokens = args.batch * args.prompt
    head = (
        f"{'model':<9} {'top-k':>5} | {'prefill tok/s':>13} {'x stock':>8} {'x floor':>8} {'MoE x st':>8} | "
        f"{'decode tok/s':>12} {'x stock':>8} {'x floor':>8} {'MoE x st':>8}"
    )
    print(head + "\n" + "-" * len(head))
    for name, k, timings, stock_t in rows:
        cells = [  # prefill, then decode
            f"{n / t:>{width}.{digits}f} {t / t_s:>8.2f} {t / t_f:>8.2f} {moe / moe_s:>8.2f}"
            for n, width, digits, (t, moe), (t_s, moe_s), (t_f, _) in zip(
                (tokens, args.batch), (13, 12), (0, 1), timings, stock_t, floor_t, strict=True
            )
        ]
        print(f"{name:<9} {k:>5} | {cells[0]} | {cells[1]}")
    for phase, j in (("prefill", 0), ("decode", 1)):
        ms = ", ".join(
            f"{name} {result[(name, k)][j][0] * 1e3:.1f} / {result[(name, k)][j][1] * 1e3:.1f}"
            for name, k in (("stock", 7), ("flexmore", 7), ("floor", 1))
        )
        print(f"{phase} ms per forward (whole / inside the MoE blocks): {ms}")
    print(
        "\n'x stock' / 'x floor': time of the whole forward relative to stock FlexOlmo at the same top-k / to the "
        "floor;\n'MoE x st': time inside the MoE blocks (router + experts) relative to stock's (lower is better)."
    )
    H, I = c.hidden_size, c.intermediate_size
    low = sum(3 * r * (H + I) for r in c.expert_ranks if r)
    attn, full = 4 * H * H, 3 * H * I
    print(
        f"bounds at top-7: per-token MACs per layer: attention projections {attn / 1e6:.1f}M, one full expert "
        f"{full / 1e6:.1f}M, all low-rank terms {low / 1e6:.1f}M -> FlexMoRE/floor (attention + FFN) "
        f"{(attn + full + low) / (attn + full):.2f}x, FlexMoRE/stock {(attn + full + low) / (attn + 7 * full):.2f}x"
    )
    read = {name: weight_bytes(m) for name, m in (("stock", stock), ("flexmore", flexmore), ("floor", floor))}
    print(
        f"  weights read per decode step (every expert is routed at top-7): stock {read['stock'] / 1e6:.0f} MB, "
        f"FlexMoRE {read['flexmore'] / 1e6:.0f} MB, floor {read['floor'] / 1e6:.0f} MB -> FlexMoRE/stock "
        f"{read['flexmore'] / read['stock']:.2f}x, FlexMoRE/floor {read['flexmore'] / read['floor']:.2f}x"
    )
    load = os.getloadavg()[0]
    print(f"load average (1 min) before {load_before:.2f}, after {load:.2f} on {os.cpu_count()} CPUs")
    if max(load_before, load) > 0.5 + args.threads:
        print("WARNING: other processes were running; timings are noisy, compare ratios within this run only")


if __name__ == "__main__":
    main()
