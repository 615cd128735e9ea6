"""The one matplotlib set-up: a headless figure, imported only when a plot is drawn.

The figure draws on its own Agg canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), so
neither pyplot nor the process-wide backend is touched: a notebook keeps the backend it chose, and
no figure needs closing (nothing but the caller holds it).
"""
from __future__ import annotations

from typing import Any


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (5.5, 3.5)) -> tuple[Any, Any]:
    """``(fig, axes)`` like ``plt.subplots``, on a private Agg canvas (no display needed, no backend switched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols)
