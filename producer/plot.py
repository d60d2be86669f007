"""Reward and loss curves from a model's ``history.jsonl``, as a PNG (``trainq plot``)."""

from __future__ import annotations

import os
from pathlib import Path

from producer.history import HISTORY_FILE, read_history

__all__ = ["plot_history", "series"]

# What is worth a panel, in order; each is drawn for every split that logged it.
PANELS = ("reward", "loss")


def series(records: list[dict[str, object]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """``{split: [(step, value), ...]}`` for every ``{split}/{metric}`` in ``records``, by step.

    A step logged twice for one split keeps its last value (a re-run step replaces the old one).
    """
    by_split: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            split, _, name = key.partition("/")
            if name == metric and isinstance(value, (int, float)):
                by_split.setdefault(split, {})[step] = float(value)
    return {split: sorted(points.items()) for split, points in sorted(by_split.items())}


def plot_history(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Draw reward and loss against step; return the PNG's path.

    Parameters:
        path: a model folder (``.trainq/{project}/models/{name}``) or its ``history.jsonl``.
        output: the PNG to write; default ``history.png`` beside the history file.
    """
    source = Path(path)
    history_file = source / HISTORY_FILE if source.is_dir() else source
    records = read_history(history_file)
    if not records:
        raise FileNotFoundError(f"no history in {history_file}: log some steps with model.log first")
    output = Path(output) if output is not None else history_file.with_name("history.png")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 3 * len(PANELS)), sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], PANELS):
        drawn = series(records, metric)
        for split, points in drawn.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=split)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {metric} logged", ha="center", va="center", transform=ax.transAxes)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(history_file.parent.name)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
