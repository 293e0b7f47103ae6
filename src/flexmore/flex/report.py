"""A run's summary (per-client ROUGE-L and average, knowledge retention, expert load std, bytes per
round), its Markdown report and plots, and the paper-style table comparing several runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexmore.storage import atomic_write_text

from .config import FlexConfig

SUMMARY = "summary.json"


def summarize(
    config: FlexConfig, evaluation: Mapping[int, Mapping[str, float]], rounds: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    clients = sorted(evaluation)
    mean = (
        (lambda key: sum(evaluation[c][key] for c in clients) / len(clients)) if clients else (lambda key: float("nan"))
    )
    per_round = [r["bytes_sent"] + r["bytes_received"] for r in rounds]
    return {
        "method": config.method,
        "rouge_l": {str(c): evaluation[c]["rouge-l"] for c in clients},
        "rouge_l_avg": mean("rouge-l"),
        "retention_loss": mean("retention-loss"),
        "expert_std": mean("expert-std"),
        "bytes_per_round": per_round[-1] if per_round else 0,
        "payload_bytes_per_round": (rounds[-1]["payload_bytes_sent"] + rounds[-1]["payload_bytes_received"])
        if rounds
        else 0,
        "bytes_total": sum(per_round),
        "train_loss": [sum(c["train-loss"] for c in r["clients"]) / len(r["clients"]) for r in rounds],
        "rounds": len(rounds),
    }


def write_report(
    out: Path, config: FlexConfig, evaluation: Mapping[int, Mapping[str, float]], rounds: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """OUT/summary.json, OUT/report.md and OUT/train_loss.png; returns the summary under `summary`."""
    summary = summarize(config, evaluation, rounds)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", table([summary]) + "\n")
    _plot(out / "train_loss.png", summary)
    return {"summary": summary}


def _plot(path: Path, summary: Mapping[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the numbers are in summary.json
        return
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(1, len(summary["train_loss"]) + 1), summary["train_loss"], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("mean client training loss")
    ax.set_title(summary["method"])
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """The paper's table: ROUGE-L per client and average, retention loss, expert std, bytes per round."""
    clients = sorted({c for s in summaries for c in s["rouge_l"]}, key=int)
    head = ["method", *[f"client {c}" for c in clients], "avg ROUGE-L", "retention loss", "expert std", "bytes/round"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s["method"], *[f"{100 * s['rouge_l'].get(c, float('nan')):.2f}" for c in clients]]
        cells += [f"{100 * s['rouge_l_avg']:.2f}", f"{s['retention_loss']:.4f}", f"{s['expert_std']:.4f}"]
        cells += [f"{s['payload_bytes_per_round']:,}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
