"""The figure-writing edge: matplotlib (the ``plots`` extra) with the Agg renderer and no pyplot state, PNGs
written with fixed metadata so the same inputs give the same bytes; and the layout of a ``show`` view."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from maestro_data.errors import MaestroError
from maestro_data.inspect.show import Panel, TileView

COLUMNS = 12  # layout cells per row
CELL_IN = 1.15  # inches per cell
TITLE_CELLS = 0.35  # height of a section title row, in cells
GAP_CELLS = 0.7  # below sections with rotated tick labels
HEADER_IN = 0.8  # figure title
HIGHLIGHT = "#ff9f00"


def new_figure(width_in: float, height_in: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MaestroError("figures need matplotlib: pip install 'maestro-eo[plots]'") from None
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG (no software tag or date: identical inputs give identical bytes), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    os.replace(tmp, path)
    return path


Item = Panel | str | list[Panel]  # a panel, a section title, or a mosaic of thumbnails


def _shelves(view: TileView) -> tuple[list[float], list[tuple[int, int, int, int, Item]]]:
    """Row heights (cells) and placements (row, col, rows, cols, item): each section starts with a title row, then
    its panels fill rows left to right, wrapping at ``COLUMNS``; a section of one-cell thumbnails is one mosaic
    (one axes for a hundred dates: drawing an axes per date took seconds)."""
    heights: list[float] = []
    placed: list[tuple[int, int, int, int, Item]] = []
    for section in view.sections:
        placed.append((len(heights), 0, 1, COLUMNS, section.title))
        heights.append(TITLE_CELLS)
        if section.panels and all(p.size == (1, 1) and p.kind in ("rgb", "gray") for p in section.panels):
            rows = -(-len(section.panels) // COLUMNS)
            placed.append((len(heights), 0, rows, COLUMNS, section.panels))
            heights.extend([1.0] * rows)
            continue
        top, col, shelf = len(heights), 0, 0
        for panel in section.panels:
            w, h = min(panel.size[0], COLUMNS), panel.size[1]
            if col + w > COLUMNS:
                top, col, shelf = top + shelf, 0, 0
            shelf = max(shelf, h)
            heights.extend([1.0] * (top + shelf - len(heights)))
            placed.append((top, col, h, w, panel))
            col += w
        if any(p.kind in ("bars", "series") for p in section.panels):
            heights.append(GAP_CELLS)  # room for their rotated tick labels
    return heights, placed


def draw_view(view: TileView) -> Any:
    """The figure of a ``show`` view."""
    heights, placed = _shelves(view)
    height = sum(heights) * CELL_IN + HEADER_IN
    fig = new_figure(COLUMNS * CELL_IN, height)
    grid = fig.add_gridspec(len(heights), COLUMNS, height_ratios=heights, left=0.02, right=0.98, bottom=0.01,
                            top=1 - HEADER_IN / height, hspace=0.55, wspace=0.25)
    fig.suptitle(view.title, fontsize=11, x=0.02, y=1 - 0.25 / height, ha="left", va="top")
    for row, col, h, w, item in placed:
        ax = fig.add_subplot(grid[row:row + h, col:col + w])
        if isinstance(item, str):
            ax.axis("off")
            ax.text(0, 0.2, item, fontsize=9, fontweight="bold", transform=ax.transAxes)
        elif isinstance(item, list):
            _mosaic(fig, ax, item, h)
        else:
            _draw_panel(ax, item)
    return fig


def _mosaic(fig: Any, ax: Any, panels: list[Panel], rows: int) -> None:
    """Thumbnails on one axes, ``COLUMNS`` per row, each square with its title above and, when highlighted, a
    frame; the cloud mask as a translucent red overlay."""
    from matplotlib.patches import Rectangle

    ax.set_xlim(0, COLUMNS)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    box = ax.get_position()
    unit_w, unit_h = box.width * fig.get_figwidth() / COLUMNS, box.height * fig.get_figheight() / rows
    side = 0.68 * min(unit_w, unit_h)  # inches
    w, h = side / unit_w, side / unit_h  # data units
    for k, panel in enumerate(panels):
        x0, y1 = k % COLUMNS + (1 - w) / 2, k // COLUMNS + 0.97
        extent = (x0, x0 + w, y1, y1 - h)
        ax.imshow(panel.data, cmap="gray" if panel.kind == "gray" else None, vmin=0, vmax=1,
                  interpolation="nearest", extent=extent, aspect="auto")
        if panel.overlay is not None and panel.overlay.any():
            red = np.zeros((*panel.overlay.shape, 4))
            red[panel.overlay] = (1.0, 0.0, 0.0, 0.3)
            ax.imshow(red, interpolation="nearest", extent=extent, aspect="auto")
        ax.add_patch(Rectangle((x0, y1 - h), w, h, fill=False, edgecolor=HIGHLIGHT if panel.highlight else "black",
                               linewidth=2.5 if panel.highlight else 0.5))
        ax.text(x0 + w / 2, y1 - h - 0.03, panel.title, ha="center", va="bottom", fontsize=6.5,
                color=HIGHLIGHT if panel.highlight else "black", fontweight="bold" if panel.highlight else "normal")


def _draw_panel(ax: Any, panel: Panel) -> None:
    """One big panel (thumbnails go through ``_mosaic``)."""
    ax.set_title(panel.title, fontsize=8)
    if panel.kind in ("rgb", "gray", "classes"):
        ax.imshow(panel.data, cmap="gray" if panel.kind == "gray" else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    elif panel.kind == "bars":
        _bars(ax, panel)
    elif panel.kind == "series":
        _series(ax, panel)
    elif panel.kind == "legend":
        ax.axis("off")
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=tuple(c), edgecolor="black", linewidth=0.3, label=n) for n, c in panel.data]
        ax.legend(handles=handles, loc="upper left", fontsize=6.5, frameon=False, ncol=1 + len(handles) // 12)
    else:
        ax.axis("off")
        ax.text(0, 0.5, str(panel.data), fontsize=8, transform=ax.transAxes)


def _bars(ax: Any, panel: Panel) -> None:
    meta, values = panel.meta, panel.data
    missing = values == meta["missing"]
    x = np.arange(len(values))
    ax.bar(x, np.where(missing, 0, values), color=[tuple(c) for c in meta["colors"]], edgecolor="black",
           linewidth=0.4)
    for i in np.flatnonzero(missing):
        ax.text(i, 0.02, "missing", rotation=90, fontsize=6, ha="center", va="bottom")
    if meta["threshold"] is not None:
        ax.axhline(meta["threshold"], color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, meta["classes"], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.tick_params(axis="y", labelsize=7)


def _series(ax: Any, panel: Panel) -> None:
    meta, values = panel.meta, panel.data
    t = np.arange(values.shape[0])
    for c, band in enumerate(meta["bands"]):
        ax.plot(t, values[:, c], marker=".", markersize=2.5, linewidth=0.7, label=band)
    for k in meta["marks"]:
        ax.axvline(k, color=HIGHLIGHT, linewidth=1.2, alpha=0.8)
    step = max(1, len(t) // 8)
    ax.set_xticks(t[::step], [meta["dates"][k] for k in t[::step]], rotation=30, ha="right", fontsize=6.5)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
