"""The module's figures, from the results the ranks returned (code/megatron.py's run)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .pipeline import SCHEDULES

COLOURS = {"F": "tab:blue", "B": "tab:orange"}


def plot_timeline(steps_by_rank: list[list[dict]], m: int, bubbles: list[dict]):
    p = len(steps_by_rank)
    fig, axes = plt.subplots(len(SCHEDULES), 1, figsize=(10, 1.2 + 0.9 * p * len(SCHEDULES)), squeeze=False)
    for ax, kind in zip(axes[:, 0], SCHEDULES):
        last = max(s["step"] for s in steps_by_rank[0] if s["schedule"] == kind and s["m"] == m)
        same = [next(s for s in steps if s["schedule"] == kind and s["m"] == m and s["step"] == last)
                for steps in steps_by_rank]
        t0 = min(s["start"] for s in same)
        for rank, s in enumerate(same):
            for op, i, start, end in s["events"]:
                ax.barh(rank, (end - start) * 1e3, left=(start - t0) * 1e3, color=COLOURS[op], edgecolor="white")
                ax.text((start + end - 2 * t0) / 2 * 1e3, rank, str(i), ha="center", va="center", fontsize=7)
        row = next(b for b in bubbles if b["schedule"] == kind and b["m"] == m)
        ax.set(yticks=range(p), yticklabels=[f"stage {r}" for r in range(p)], xlabel="ms since the step started",
               title=f"{kind}, p={p}, m={m}: bubble {row['measured']:.3f} measured (median step), "
                     f"{row['formula']:.3f} = (p-1)/(m+p-1)")
        ax.invert_yaxis()
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, label=f"{op} of the micro-batch numbered")
                        for op, c in COLOURS.items()], loc="lower center", ncol=len(COLOURS), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_bubbles(bubbles: list[dict], p: int):
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ms = sorted({b["m"] for b in bubbles})
    grid = np.linspace(1, max(ms), 200)
    ax.plot(grid, (p - 1) / (grid + p - 1), color="black", lw=1, label="(p-1)/(m+p-1)")
    for kind, marker in zip(SCHEDULES, ("o", "s")):
        rows = [b for b in bubbles if b["schedule"] == kind]
        ax.errorbar([b["m"] for b in rows], [b["measured"] for b in rows],
                    yerr=[[b["measured"] - b["measured_min"] for b in rows], [b["measured_max"] - b["measured"] for b in rows]],
                    fmt=marker, capsize=3, label=f"{kind}, measured (median, min-max)")
    ax.set(xscale="log", xticks=ms, xticklabels=ms, xlabel="micro-batches m", ylabel="bubble = idle / total",
           title=f"pipeline bubble, p = {p} stages", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training(dense: list[float], parallel: dict[str, list[float]]):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(dense, color="black", lw=3, alpha=0.4, label="dense, one process")
    for (mode, losses), style in zip(parallel.items(), ("--", ":")):
        ax.plot(losses, style, label=f"{mode}, rank 0")
    ax.set(xlabel="step", ylabel="cross-entropy", title="training: tensor / sequence parallel vs dense")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_memory(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = [r["layout"] for r in rows]
    norms = np.array([r["saved_norms"] for r in rows]) / 1024
    rest = np.array([r["saved_total"] - r["saved_norms"] for r in rows]) / 1024
    ax.bar(names, norms, label="kept by the norms (replicated region)")
    ax.bar(names, rest, bottom=norms, label="kept by attention and MLP")
    ax.set(ylabel="KiB per rank", title="activations saved for backward, one block")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
