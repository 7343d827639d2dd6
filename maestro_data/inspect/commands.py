"""The library side of `maestro-data show` and `maestro-data stats`: read, compute, write (the CLI stays thin)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from maestro_data.build.tile_store import TileStore
from maestro_data.inspect.figures import draw_view, save_png
from maestro_data.inspect.proposal import GROUP_DISTANCE, Proposal, manifest_with
from maestro_data.inspect.samples import display_manifest, load_sample, model_sample
from maestro_data.inspect.show import TileView, model_view, tile_view
from maestro_data.inspect.stats import compute_stats
from maestro_data.inspect.stats_figures import write_stats_figures


@dataclass(frozen=True)
class SampleOptions:
    """``--sample``: render what the loader yields for this (mode, seed, epoch, crop)."""

    mode: str = "train"
    seed: int = 0
    epoch: int = 0
    crop: int = 0


def tile_figure(location: str | Path, tile_id: str, sample: SampleOptions | None = None, crop: int = 0,
                manifest: str | Path | None = None) -> TileView:
    """The view of one tile of a store or index: every date as stored, or (``sample``) what the model receives."""
    decoded, built = load_sample(location, tile_id)
    chosen = display_manifest(built, manifest)
    if sample is None:
        return tile_view(decoded, chosen, crop)
    arrays, d4 = model_sample(decoded, chosen, sample.mode, sample.seed, sample.epoch, sample.crop)
    return model_view(arrays, chosen, tile_id, sample.mode, sample.seed, sample.epoch, sample.crop, d4)


def show_tile(location: str | Path, tile_id: str, out: str | Path, sample: SampleOptions | None = None,
              crop: int = 0, manifest: str | Path | None = None) -> Path:
    """Write the tile's figure to ``out`` (PNG)."""
    return save_png(draw_view(tile_figure(location, tile_id, sample, crop, manifest)), out)


def run_stats(store_path: str | Path, out: str | Path, split: str | None = None, subset: int | None = None,
              distance: float = GROUP_DISTANCE, write_manifest: str | Path | None = None,
              quiet: bool = True) -> dict:
    """``stats.json`` and its figures in ``out``; with ``write_manifest`` a copy of the store's manifest holding the
    proposed norm factors and groups. Returns the stats."""
    store = TileStore(store_path)
    stats = compute_stats(store, split, subset, distance=distance, quiet=quiet)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=1, allow_nan=False))
    tmp.replace(out / "stats.json")
    write_stats_figures(stats, out)
    if write_manifest is not None:
        proposals = {name: Proposal(tuple(m["groups"]["proposed"]["select"]),
                                    tuple(m["groups"]["proposed"]["norm_groups"]), m["norm_factor"]["proposed"])
                     for name, m in stats["modalities"].items()}
        Path(write_manifest).write_text(manifest_with(store.manifest, proposals), encoding="utf-8")
    return stats


def group_table(stats: dict) -> list[str]:
    """Lines comparing the manifest's norm groups and factors with the proposal, per modality."""
    lines = [f"band groups (average linkage of 1 - |r|, cut at {_distance(stats)}) and norm factors (uint8: 255; "
             "else the 1-2-5 number nearest the largest |1st or 99th percentile|):"]
    for name, m in stats["modalities"].items():
        g = m["groups"]
        for label, which, factor in (("manifest", g["manifest"], m["norm_factor"]["manifest"]),
                                     ("proposed", g["proposed"], m["norm_factor"]["proposed"])):
            bands = " | ".join(" ".join(group) for group in which["bands"])
            moved = label == "proposed" and which["select"] != g["manifest"]["select"]
            note = f"   (reorders select to {which['select']})" if moved else ""
            lines.append(f"  {name if label == 'manifest' else '':10s}{label} {str(which['norm_groups']):14s}"
                         f"factor {factor:<8g} {bands}{note}")
    return lines


def _distance(stats: dict) -> float:
    return next(iter(stats["modalities"].values()))["groups"]["proposed"]["distance"]
