"""Figures of ``stats.json`` (pure functions of the stats dict, so the numbers behind every figure are in the
JSON): per-band histograms of each modality, and the band correlation matrices with the band groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from maestro_data.inspect.figures import new_figure, save_png


def histogram_figure(name: str, stats: dict) -> Any:
    """Every stored band's coarse histogram on one axes (log10 counts), the legend giving its mean, std and 1st-99th
    percentile range (one axes per figure: an axes per band made the figure several times slower to write)."""
    fig = new_figure(9, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    for band, b in stats["bands"].items():
        edges, counts = b["histogram"]["edges"], b["histogram"]["counts"]
        if not counts:
            continue
        p1, p99 = b["percentiles"]["1"], b["percentiles"]["99"]
        ax.stairs(np.log10(np.asarray(counts) + 1.0), edges, linewidth=1.1,
                  label=f"{band}: mean {b['mean']:.4g}, std {b['std']:.4g}, p1-p99 {p1:.4g}-{p99:.4g}, NaN {b['nan']}")
    values = "log values" if stats["values"] == "log" else f"{stats['dtype']} values"
    ax.set_title(f"{name}: {values}, cloud-masked and non-finite values excluded", fontsize=10)
    ax.set_ylabel("log10(count + 1)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.92)
    return fig


def correlation_figure(modalities: dict[str, dict]) -> Any:
    """One heatmap per modality with more than one band (its model bands, in the manifest's order), |r| written in
    each cell; dashed lines cut the manifest's norm groups, tick labels take the colour of their proposed group."""
    shown = {n: m for n, m in modalities.items() if len(m["groups"]["manifest"]["bands"]) and
             sum(len(g) for g in m["groups"]["manifest"]["bands"]) > 1}
    fig = new_figure(4.6 * max(1, len(shown)), 5.2)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for k, (name, m) in enumerate(shown.items()):
        ax = fig.add_subplot(1, len(shown), k + 1)
        order = [b for g in m["groups"]["manifest"]["bands"] for b in g]
        idx = [m["correlation"]["bands"].index(b) for b in order]
        r = np.asarray(m["correlation"]["matrix"], dtype=float)[np.ix_(idx, idx)]
        ax.imshow(r, vmin=-1, vmax=1, cmap="RdBu_r")
        if len(order) <= 12:
            for i in range(len(order)):
                for j in range(len(order)):
                    if np.isfinite(r[i, j]):
                        ax.text(j, i, f"{r[i, j]:.2f}", ha="center", va="center", fontsize=6)
        cut = np.cumsum(m["groups"]["manifest"]["norm_groups"])[:-1] - 0.5
        for c in cut:
            ax.axhline(c, color="black", linestyle="--", linewidth=1)
            ax.axvline(c, color="black", linestyle="--", linewidth=1)
        group_of = {b: g for g, members in enumerate(m["groups"]["proposed"]["bands"]) for b in members}
        ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
        ax.set_yticks(range(len(order)), order, fontsize=7)
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            for label, band in zip(labels, order, strict=True):
                label.set_color(palette[group_of[band] % len(palette)])
        ax.set_title(f"{name}: manifest {m['groups']['manifest']['norm_groups']} (dashed)\n"
                     f"proposed {m['groups']['proposed']['norm_groups']} (label colours)", fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, wspace=0.35)
    return fig


def write_stats_figures(stats: dict, out: str | Path) -> list[Path]:
    """``hist_<modality>.png`` per modality and ``correlation.png`` in ``out``."""
    out = Path(out)
    written = [save_png(histogram_figure(name, m), out / f"hist_{name}.png") for name, m in
               stats["modalities"].items()]
    written.append(save_png(correlation_figure(stats["modalities"]), out / "correlation.png"))
    return written
