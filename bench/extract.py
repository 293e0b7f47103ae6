"""Extraction benchmark: SVD backends side by side, and peak memory of a streamed extraction.

Part 1 times each backend on a synthetic expert delta (singular values ~ i^-0.6 plus noise: a slowly
decaying spectrum, the hard case for truncation) of the 7B shape (4096 x 11008) and a smaller one, at
ranks 64, 512 and 2048, against the reference of the paper's scripts and mergekit: one full
`torch.linalg.svd` per rank. Errors are the excess Frobenius error over the Eckart-Young optimum.
Ours factorises once at the largest rank and takes every smaller rank as a prefix.

Part 2 extracts a 2-expert checkpoint with 2 and with 8 layers in fresh processes and reports the
peak anonymous memory (RssAnon, sampled), which must not grow with the number of layers.

    python bench/extract.py            # full run (~6 min on 2 cores)
    python bench/extract.py --quick    # small shapes only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from flexmore.lowrank.svd import factorize

RANKS = (64, 512, 2048)
ALL_RANKS = tuple(1 << k for k in range(12))  # 1 .. 2048


def spectral(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.6
    return (U * s) @ V.T + 1e-4 * torch.randn(m, n, generator=g)


def excess(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, optimum: float) -> float:
    return float(torch.linalg.norm((delta - B @ A).double())) / optimum - 1


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_matrix(m: int, n: int, ranks: tuple[int, ...]) -> None:
    delta = spectral(m, n)
    ranks = tuple(r for r in ranks if r < min(m, n))
    top = max(ranks)
    print(f"\n## delta {m} x {n}, ranks {', '.join(map(str, ranks))}")
    # Reference: a full SVD per rank (what one-rank-at-a-time scripts pay).
    ref_times, ref_factors = [], {}
    for r in ranks:
        (U, S, Vh), t = timed(lambda: torch.linalg.svd(delta, full_matrices=False))
        ref_times.append(t)
        ref_factors[r] = (S[:r, None] * Vh[:r], U[:, :r])  # (A, B) up to the sqrt split
    S_all = torch.linalg.svdvals(delta.double())
    optimum = {r: float(S_all[r:].square().sum().sqrt()) for r in ALL_RANKS + ranks if r < min(m, n)}
    ref_errs = {r: excess(delta, *ref_factors[r], optimum[r]) for r in ranks}
    rows = [("reference: torch.linalg.svd per rank", sum(ref_times), ref_errs)]
    for label, backend, dtype in (
        ("exact (one svd, prefixes)", "exact", torch.float32),
        ("gram + eigh, float32", "gram", torch.float32),
        ("gram + eigh, float64", "gram", torch.float64),
    ):
        x = delta.to(dtype)
        fact, t = timed(lambda x=x, backend=backend: factorize(x, top, backend))
        errs = {}
        for r in ranks:
            A, B = fact.phlora(r)
            errs[r] = excess(delta, A.float(), B.float(), optimum[r])
        rows.append((label, t, errs))
    # Randomized serves one rank well (its sketch is 2r): time it at each rank on its own.
    for r in ranks:
        fact, t = timed(lambda r=r: factorize(delta, r, "randomized"))
        A, B = fact.phlora(r)
        rows.append((f"randomized at r={r} only (sketch {min(2 * r, m, n)})", t, {r: excess(delta, A, B, optimum[r])}))
    print("| backend | time (s) | x faster than reference | " + " | ".join(f"excess err r={r}" for r in ranks) + " |")
    print("|---|---|---|" + "---|" * len(ranks))
    for label, t, errs in rows:
        cells = " | ".join(f"{errs[r]:.1e}" if r in errs else "" for r in ranks)
        print(f"| {label} | {t:.2f} | {sum(ref_times) / t:.1f} | {cells} |")

    # The goal: every power-of-two rank up to 2048 from one factorisation, at the exact backend's error.
    all_ranks = tuple(r for r in ALL_RANKS if r < min(m, n))
    top_all = max(all_ranks)
    (fact, t_fact) = timed(lambda: factorize(delta, top_all, "auto"))
    pairs, t_prefix = timed(lambda: {r: fact.phlora(r) for r in all_ranks})
    worst = max(excess(delta, A, B, optimum[r]) for r, (A, B) in pairs.items())
    per_call = sum(ref_times) / len(ref_times)
    print(
        f"\nall {len(all_ranks)} ranks 1..{top_all} with --svd auto ({fact.backend}): factorise {t_fact:.2f}s "
        f"+ {t_prefix:.2f}s to form the {len(all_ranks)} prefix pairs = {t_fact + t_prefix:.2f}s, "
        f"worst excess error {worst:.1e}; "
        f"reference: {len(all_ranks)} x {per_call:.1f}s = {len(all_ranks) * per_call:.1f}s "
        f"({len(all_ranks) * per_call / (t_fact + t_prefix):.1f}x)"
    )


# -- part 2: memory of a streamed extraction ------------------------------------------------------

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
from flexmore.lowrank.extract import ExtractConfig, extract
peak = [0]
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0
stop = False
def sample():
    while not stop:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
base = anon()
t = threading.Thread(target=sample, daemon=True); t.start()
start = time.perf_counter()
extract(ExtractConfig(source=sys.argv[1], out=Path(sys.argv[2]), max_rank=64, svd="randomized"))
stop = True; t.join()
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"baseline": base, "peak_anon": peak[0], "vm_hwm": hwm, "seconds": time.perf_counter() - start}))
"""


def bench_memory(hidden: int, intermediate: int) -> None:
    from flexmore.toy import save_tiny_flexolmo, tiny_config

    print(f"\n## peak memory of extracting a 2-expert checkpoint (hidden {hidden}, intermediate {intermediate})")
    print("| layers | checkpoint (MB) | one matrix (MB) | peak RssAnon during extraction (MB) | above start (MB) | s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (2, 8):
            src = Path(tmp) / f"L{layers}"
            cfg = tiny_config(
                2,
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_hidden_layers=layers,
                vocab_size=1024,
                num_attention_heads=8,
            )
            save_tiny_flexolmo(src, cfg, max_shard_size="100MB")
            size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), str(Path(tmp) / f"out{layers}")],
                check=True,
                capture_output=True,
                text=True,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            mb = 2**20
            print(
                f"| {layers} | {size:.0f} | {hidden * intermediate * 4 / mb:.1f} | {r['peak_anon'] / mb:.0f} | "
                f"{(r['peak_anon'] - r['baseline']) / mb:.0f} | {r['seconds']:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        bench_matrix(512, 1376, (16, 64, 256))
        bench_memory(512, 1376)
        return
    bench_matrix(1024, 2752, RANKS)
    bench_matrix(4096, 11008, RANKS)
    bench_memory(1024, 2752)


if __name__ == "__main__":
    _ = threading  # the child script samples memory in a thread
    main()
