"""The one matplotlib set-up: a headless figure (Agg), imported only when a plot is drawn."""
from __future__ import annotations

from typing import Any


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (5.5, 3.5)) -> tuple[Any, Any]:
    """``(fig, axes)`` like ``plt.subplots``, on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size)
