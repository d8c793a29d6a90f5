"""PNG figures for people: learning curves, before/after adaptation, propensity weights (matplotlib, no screen)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curve(curve: list[dict], path: str | Path, title: str) -> Path:
    """Mean training-episode return against environment steps (from meta_train's curve)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["mean_return"] for c in curve], marker=".")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean episode return (with exploration)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def returns_by_method(per_task: dict[str, list[float]], task_names: list[str], path: str | Path,
                      title: str) -> Path:
    """Grouped bars: one group per task, one bar per method (zero-shot, MQL, fine-tuning ...)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(task_names)), 3.8))
    width = 0.8 / len(per_task)
    x = np.arange(len(task_names))
    for i, (method, values) in enumerate(per_task.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{method} (mean {np.mean(values):.1f})")
    ax.set_xticks(x, task_names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def weight_histogram(edges: list[float], counts: list[int], path: str | Path, title: str) -> Path:
    """Histogram of the propensity weights of the archived transitions."""
    fig, ax = plt.subplots(figsize=(5, 3))
    edges = np.asarray(edges, dtype=float)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="k")
    ax.set_xlabel("propensity weight beta")
    ax.set_ylabel("archived transitions")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
