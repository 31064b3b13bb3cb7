"""PNG figures for benchmarks, experiments and the README (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _plt():
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:  # a notebook keeps its inline backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quality_bars(tables: Mapping[str, object], k: int, metrics: Sequence[str] = ("ndcg", "recall"),
                 title: str = ""):
    """One panel per entry of ``tables`` (label -> models x metrics, a DataFrame or a dict of
    dicts): bars of ``<metric>_at_<k>`` per model. Returns the figure."""
    import pandas as pd

    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables) + 1, 3.4), squeeze=False)
    for ax, (label, table) in zip(axes[0], tables.items()):
        df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table).T
        cols = [f"{m}_at_{k}" for m in metrics if f"{m}_at_{k}" in df]
        df = df[cols].astype(float).sort_values(cols[0])
        width = 0.8 / len(cols)
        for n, col in enumerate(cols):
            ax.barh([y + n * width for y in range(len(df))], df[col], width,
                    label=col.replace("_at_", "@"))
        ax.set_yticks([y + 0.4 - width / 2 for y in range(len(df))])
        ax.set_yticklabels(df.index)
        ax.set_title(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0][-1].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def freshness_timeline(rows: Sequence[tuple[str, float, float]], title: str = ""):
    """Horizontal bars ``(label, start_s, end_s)``: when each step of a freshness run began and
    ended, in seconds from the change. Spans over more than two orders of magnitude get a log
    axis (milliseconds next to a minute). Returns the figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    spans = [max(end - start, 1e-4) for _, start, end in rows]
    log = bool(rows) and max(spans) / min(spans) > 100
    floor = min(spans) / 2 if log else 0.0
    for y, (_label, start, end) in enumerate(rows):
        left = max(start, floor)
        ax.barh(y, max(end, left * 1.01) - left, left=left, color="tab:blue")
        took = end - start
        ax.text(max(end, left), y, f" {took * 1e3:.1f} ms" if took < 1 else f" {took:.1f} s",
                va="center", fontsize=8)
    if log:
        ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the change")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    _plt().close(fig)
    return path
