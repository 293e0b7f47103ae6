"""FLEx vs baselines on the embedded default, side by side in one run (the paper's table).

    .venv/bin/python bench/flex.py --out /tmp/flex-bench [--rounds 3 --local-steps 20 --clients 4]

Each method runs through the same harness as `flexmore flex --simulation` (Flower's simulation engine)
into OUT/<method>; the table is printed and written to OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flexmore.federated.flex_runner import run_flex_simulation
from flexmore.flex.config import FlexConfig
from flexmore.flex.pretrain import resolve_model
from flexmore.flex.report import table

METHODS = ("flex", "flex-nogate", "fedavg", "fedprox", "fedavgm", "local")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--gate-bias", type=float, default=None, help="FLEx gate's initial bias (default: config's)")
    args = parser.parse_args()
    model = resolve_model("embedded", print)
    start = time.perf_counter()
    summaries = []
    for method in args.methods.split(","):
        t = time.perf_counter()
        extra = {} if args.gate_bias is None else {"gate_bias": args.gate_bias}
        config = FlexConfig(model=model, out=args.out / method, method=method, clients=args.clients,
                            rounds=args.rounds, local_steps=args.local_steps, **extra)  # fmt: skip
        report = run_flex_simulation(config).report
        if report.get("error"):
            raise SystemExit(f"{method}: {report['error']}")
        summaries.append(report["summary"])
        print(f"{method}: {time.perf_counter() - t:.0f}s", json.dumps(report["summary"]), flush=True)
    text = table(summaries)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
