"""Shared-base forward of a FlexMoRE layer (paper eq. 7, made cheap, exact by linearity).

A low-rank expert i on full root W0 computes
    gate_i(x) = W0_g x + sum_c B_gc (A_gc x)        (c along i's chain of bases; up_proj likewise)
    h_i = silu(gate_i(x)) * up_i(x)
    out_i = W0_d h_i + sum_c B_dc (A_dc h_i).
For the tokens routed into a root's tree (the root and every low-rank expert whose chain ends at it),
W0_g x and W0_u x are computed once per token, and the base down projection once on the
routing-weighted sum:
    sum_i p_i out_i = W0_d (sum_i p_i h_i) + sum_i sum_c B_dc A_dc (p_i h_i).
Low-rank terms are computed per routed expert on the gathered tokens (batched matmuls). Tokens that
route into no member of a tree never touch its root. Full experts that are roots of nothing are just
trees of one: computed as stock FlexOlmo does.

Two implementations of one algorithm: under autograd, plain out-of-place ops; under no_grad, token
chunks (on CPU) so each expert's (chunk, I) temporaries stay in cache, with preallocated buffers and
in-place ops, because on CPU the elementwise passes and fresh allocations, not the matmuls, are what
the low-rank experts add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from flexmore.mixture.experts import FlexMoReExperts


def shared_base_forward(
    ex: FlexMoReExperts, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """x (T, H), top_k_index / top_k_weights (T, k) -> (T, H)."""
    T, k = top_k_index.shape
    counts, tokens, weights = ex.routes(top_k_index, top_k_weights)
    # The no-grad path also serves a forward under grad mode where nothing needs a gradient (eval loops).
    grad = torch.is_grad_enabled() and (
        x.requires_grad or top_k_weights.requires_grad or any(p.requires_grad for p in ex.parameters())
    )
    tree_fn = _tree_autograd if grad else _tree_no_grad
    out = torch.zeros_like(x)  # (T, H)
    for root, tree in ex.trees.items():
        hits = sum(counts[e] for e in tree)
        if hits == 0:
            continue  # no token routed into this tree: its root costs nothing
        p0 = None
        if counts[root] > 0:
            p0 = (top_k_weights * (top_k_index == root)).sum(-1, keepdim=True)  # (T, 1), 0 where not routed
        low = [e for e in tree if e != root and counts[e] > 0]
        if hits == T * k:  # every routing lands in this tree (the usual one-root case): no gather
            return tree_fn(ex, x, ex.slot[root], p0, low, tokens, weights, out)
        member = torch.zeros(ex.num_experts, dtype=torch.bool, device=x.device)
        member[tree] = True
        in_tree = member[top_k_index].any(dim=-1)  # (T,)
        rows = in_tree.nonzero().squeeze(-1)  # (n,) the tokens that pay for this root
        pos = torch.cumsum(in_tree, 0) - 1  # (T,) token -> its row among them
        local = [pos.index_select(0, t) if e in low else t for e, t in enumerate(tokens)]  # rows, ascending
        p0 = None if p0 is None else p0.index_select(0, rows)  # (n, 1)
        acc = x.new_zeros(rows.shape[0], x.shape[1])  # (n, H)
        acc = tree_fn(ex, x.index_select(0, rows), ex.slot[root], p0, low, local, weights, acc)
        out = out.index_add(0, rows, acc) if grad else out.index_add_(0, rows, acc)
    return out


def _base(ex: FlexMoReExperts, xs: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W0_g x and W0_u x as two contiguous (n, I) tensors (slices of one (n, 2I) would be strided)."""
    I = ex.intermediate_dim
    return F.linear(xs, ex.gate_up_proj[s, :I]), F.linear(xs, ex.gate_up_proj[s, I:])


def _tree_autograd(
    ex: FlexMoReExperts,
    xs: torch.Tensor,
    s: int,
    p0: torch.Tensor | None,
    low: list[int],
    local: list[torch.Tensor],
    weights: list[torch.Tensor],
    acc: torch.Tensor,
) -> torch.Tensor:
    """acc (n, H) + the tree's mixture output for xs (n, H); local[e]: expert e's rows of xs."""
    n = xs.shape[0]
    gate0, up0 = _base(ex, xs, s)  # (n, I) each, once per token
    h_sum = ex.act_fn(gate0) * up0 * p0 if p0 is not None else torch.zeros_like(gate0)  # (n, I)
    for e in low:
        r, p = local[e], weights[e].unsqueeze(-1)  # (n_e,), (n_e, 1)
        dense = r.shape[0] == n  # every row: r is arange(n)
        xe = xs if dense else xs.index_select(0, r)  # (n_e, H)
        ge = gate0 if dense else gate0.index_select(0, r)  # (n_e, I)
        ue = up0 if dense else up0.index_select(0, r)  # (n_e, I)
        h = ex.act_fn(_project(ex, ge, xe, e, "gate_proj")) * _project(ex, ue, xe, e, "up_proj") * p  # p_i h_i
        d = ex.lora(h, e, "down_proj")  # (n_e, H): sum_c B_dc A_dc (p_i h_i)
        h_sum = h_sum + h if dense else h_sum.index_add(0, r, h)
        acc = acc + d if dense else acc.index_add(0, r, d)
    return acc + F.linear(h_sum, ex.down_proj[s])  # W0_d once, on sum_i p_i h_i


def _project(ex: FlexMoReExperts, base: torch.Tensor, z: torch.Tensor, e: int, projection: str) -> torch.Tensor:
    """base + sum over e's chain of B_c (A_c z), each add fused into its GEMM."""
    y = base
    for c in ex.chains[e]:
        f = getattr(ex.expert(c), projection)
        y = torch.addmm(y, F.linear(z, f.lora_A), f.lora_B.t())  # (n, r) @ (r, d_out)
    return y


@torch.no_grad()
def _tree_no_grad(
    ex: FlexMoReExperts,
    xs: torch.Tensor,
    s: int,
    p0: torch.Tensor | None,
    low: list[int],
    local: list[torch.Tensor],
    weights: list[torch.Tensor],
    acc: torch.Tensor,
) -> torch.Tensor:
    """As `_tree_autograd`, in token chunks with reused buffers and in-place ops; acc is updated."""
    n, I = xs.shape[0], ex.intermediate_dim
    gate0, up0 = _base(ex, xs, s)  # (n, I) each
    h_sum = torch.empty_like(gate0)  # (n, I): sum_i p_i h_i, filled chunk by chunk
    chunk = min(n, ex.chunk_tokens) if xs.device.type == "cpu" else n  # accelerators need no blocking
    starts = list(range(0, n, chunk))
    if len(starts) > 1:  # each expert's rows are ascending: cut them at the chunk edges
        edges = torch.tensor([*starts, n], device=xs.device)  # (C+1,)
        bounds = {e: torch.searchsorted(local[e], edges).tolist() for e in low}
    else:
        bounds = {e: [0, local[e].shape[0]] for e in low}
    gate_buf, up_buf = xs.new_empty(chunk, I), xs.new_empty(chunk, I)  # (chunk, I) reused by every expert
    for c, c0 in enumerate(starts):
        c1 = min(n, c0 + chunk)
        g0, u0, hs = gate0[c0:c1], up0[c0:c1], h_sum[c0:c1]  # (m, I) views
        if p0 is not None:
            _act_(ex, hs.copy_(g0)).mul_(u0).mul_(p0[c0:c1])  # the root's own p_0 h_0
        else:
            hs.zero_()
        for e in low:
            a, b = bounds[e][c], bounds[e][c + 1]
            if a == b:
                continue
            p = weights[e][a:b].unsqueeze(-1)  # (m_e, 1)
            r = local[e][a:b]  # (m_e,) rows of xs
            dense = b - a == c1 - c0  # the whole chunk: slices, no gather
            idx = r - c0  # (m_e,) rows of the chunk
            if dense:
                xe, ge, ue = xs[c0:c1], g0, u0
            else:
                xe, ge, ue = xs.index_select(0, r), g0.index_select(0, idx), u0.index_select(0, idx)
            gate = _project_into(ex, gate_buf[: b - a], ge, xe, e, "gate_proj")  # (m_e, I)
            up = _project_into(ex, up_buf[: b - a], ue, xe, e, "up_proj")  # (m_e, I)
            h = _act_(ex, gate).mul_(up).mul_(p)  # (m_e, I): p_i h_i, in gate's buffer
            if dense:
                hs.add_(h)
                view = acc[c0:c1]  # (m, H)
                for link in ex.chains[e]:
                    f = ex.expert(link).down_proj
                    view.addmm_(F.linear(h, f.lora_A), f.lora_B.t())  # += B_d (A_d p_i h_i)
            else:
                hs.index_add_(0, idx, h)
                acc.index_add_(0, r, ex.lora(h, e, "down_proj"))  # (m_e, H)
    return acc.addmm_(h_sum, ex.down_proj[s].t())  # W0_d once, on sum_i p_i h_i


def _project_into(
    ex: FlexMoReExperts, out: torch.Tensor, base: torch.Tensor, z: torch.Tensor, e: int, projection: str
) -> torch.Tensor:
    """out = base + sum over e's chain of B_c (A_c z), written into a reused buffer."""
    for j, c in enumerate(ex.chains[e]):
        f = getattr(ex.expert(c), projection)
        za = F.linear(z, f.lora_A)  # (m, r)
        if j == 0:
            torch.addmm(base, za, f.lora_B.t(), out=out)
        else:
            out.addmm_(za, f.lora_B.t())
    return out


def _act_(ex: FlexMoReExperts, t: torch.Tensor) -> torch.Tensor:
    """The activation in place (F.silu's own kernel, so results match stock FlexOlmo's)."""
    if ex.silu:
        return F.silu(t, inplace=True)
    return t.copy_(ex.act_fn(t))
