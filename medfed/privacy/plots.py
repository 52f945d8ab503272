"""Epsilon per site against rounds, with each site's budget as a dashed line (report and audit)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_epsilon(
    series: dict[str, list[tuple[int, float]]], budgets: dict[str, float], path: Path, *, xlabel: str, title: str
) -> Path | None:
    """One line per site (``series``: label -> [(x, epsilon)]); ``budgets``: label -> lifetime epsilon."""
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, points) in enumerate(sorted(series.items())):
        colour = colours[i % len(colours)]
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, color=colour, label=label)
        if label in budgets:
            ax.axhline(budgets[label], color=colour, ls="--", lw=1, alpha=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cumulative epsilon (dashed: budget)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
