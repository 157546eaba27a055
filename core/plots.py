"""Matplotlib on the Agg backend (no display needed) and atomic PNG saving."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from core.artifacts import atomic_write  # noqa: E402


def close_figure(fig: "plt.Figure") -> None:
    plt.close(fig)


def save_figure(fig: "plt.Figure", path: str | Path, dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))
