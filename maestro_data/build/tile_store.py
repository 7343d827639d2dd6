"""Reading a complete tile store (layout: ``store.py``): the tile table, the manifest it was built with, its
subsets, and one tile at a time, each block's chunks checked against the build's integrity record on first read."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import zarr

from maestro_data import georef
from maestro_data import split_origin as origins
from maestro_data.build import integrity
from maestro_data.build.store import SCHEMA_HINTS, STORE_FORMAT, STORE_SCHEMA
from maestro_data.errors import StoreError
from maestro_data.location import Location, resolve_store
from maestro_data.manifest import parse_manifest
from maestro_data.tile import Series, Tile
from maestro_data.unlabelled import without_targets


def tree_bytes(path: Path) -> int:
    """Bytes of every file below ``path`` (a file removed during the walk is not counted)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # a file removed while we walk is simply not counted
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def is_store(path: str | Path | Location) -> bool:
    """A tile store (``<out>`` or ``<out>/store.zarr``, local or at a url), as opposed to a shard index."""
    return resolve_store(path).size("zarr.json") is not None


class TileStore:
    """Read access to a complete store: the tile table, the manifest it was built with, and one tile at a time."""

    def __init__(self, path: str | Path | Location):
        given = Location.of(path)
        if given.is_local and not given.path.exists():
            raise StoreError(f"{path}: does not exist")
        if given.is_local and not given.path.is_dir():
            raise StoreError(f"{path}: is a file, not a tile store folder")
        self.location = resolve_store(given)
        # a local store keeps a Path (messages and callers join it); a remote one is named by its url
        self.path: Path | str = self.location.path if self.location.is_local else self.location.url
        if self.location.size("zarr.json") is None:
            raise StoreError(f"{self.path}: not a tile store (no zarr.json); build one with `maestro-data build`")
        self.root = zarr.open_group(store=self.location.zarr_store(read_only=True), mode="r", zarr_format=3)
        attrs = dict(self.root.attrs)
        if attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.path}: not a maestro tile store (format {attrs.get('format')!r})")
        if attrs.get("schema") != STORE_SCHEMA:
            hint = SCHEMA_HINTS.get(attrs.get("schema"), "")
            raise StoreError(f"{self.path}: store schema {attrs.get('schema')}{hint}; this toolkit reads schema "
                             f"{STORE_SCHEMA}: rebuild it with `maestro-data build ... --overwrite`")
        if not attrs.get("complete"):
            raise StoreError(f"{self.path}: the build did not finish; rerun `maestro-data build ... --resume`")
        self.attrs = attrs
        self.block_tiles = int(attrs["block_tiles"])
        self._checked_blocks: set[int] = set()
        self._arrays: dict[str, zarr.Array] = {}
        self._raise_damage(integrity.check(self.location, "plan"))
        self.manifest = parse_manifest(attrs["manifest"]["text"], origin=f"{self.path} (stored manifest)")
        self.labelled = bool(attrs.get("labelled", True))
        if not self.labelled:
            self.manifest = without_targets(self.manifest)
        t = self.root["tiles"]
        self.tile_ids: list[str] = [str(x) for x in t["id"][:]]
        n = len(self.tile_ids)
        self.splits: list[str] = [str(x) for x in t["split"][:]]
        self.folds = t["fold"][:]
        self.lon, self.lat = t["lon"][:n], t["lat"][:n]
        self.valid = t["valid"][:n]
        self.ref_dates = t["ref_date"][:n]
        self._index = {tid: i for i, tid in enumerate(self.tile_ids)}
        self._offsets = {m: (self.root[m]["offsets"][:], self.root[m]["count"][:]) for m in self.manifest.modalities}

    def __len__(self) -> int:
        return len(self.tile_ids)

    def index(self, tile_id: str) -> int:
        try:
            return self._index[tile_id]
        except KeyError:
            raise StoreError(f"{self.path}: no tile {tile_id!r}") from None

    def counts(self, modality: str) -> np.ndarray:
        return self._offsets[modality][1]

    def _block_tiles_of(self, block: int) -> list[str]:
        return self.tile_ids[block * self.block_tiles:(block + 1) * self.block_tiles]

    def _describe(self, damage: list[integrity.Damage]) -> list[str]:
        """One line per damaged file: the file, what is wrong, and the tiles whose data it holds."""
        lines = []
        for d in damage:
            tiles = ""
            if d.part.startswith("block-"):
                ids = self._block_tiles_of(int(d.part.split("-")[1]))
                tiles = f" (tiles {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''})"
            elif d.part == "plan":
                tiles = " (the tile table: every tile)"
            lines.append(d.describe(self.location) + tiles)
        return lines

    def _raise_damage(self, damage: list[integrity.Damage]) -> None:
        if damage:
            lines = self._describe(damage)
            more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
            raise StoreError(f"damaged tile store: {lines[0]}{more}; rebuild the damaged blocks from the source "
                             "with `maestro-data build ... --resume`")

    def _check_block(self, i: int) -> None:
        block = i // self.block_tiles
        if block not in self._checked_blocks:
            self._raise_damage(integrity.check(self.location, f"block-{block}"))
            self._checked_blocks.add(block)

    def verify(self, full: bool = False) -> list[str]:
        """Every recorded file present with its size (``full``: and its sha256): one line per damaged file."""
        blocks = -(-len(self.tile_ids) // self.block_tiles) or 1
        parts = integrity.parts(blocks, "subsets" in self.root)
        found = integrity.check_parts(self.location, parts, full=full)
        damage = [d for part in parts for d in found[part]]
        return self._describe(damage)

    def _read(self, arr: zarr.Array, a: int, b: int, i: int) -> np.ndarray:
        try:
            return arr[a:b]
        except (ValueError, RuntimeError, OSError) as exc:  # zarr/numcodecs: checksum or decompression failures
            raise StoreError(f"{self.path}/{arr.path}: chunk of tile {self.tile_ids[i]!r} cannot be decoded "
                             f"({str(exc).splitlines()[0]}); run `maestro-data verify {self.path} --full`") from None

    def read_series(self, i: int, modality: str) -> Series:
        self._check_block(i)
        off, cnt = self._offsets[modality]
        a, b = int(off[i]), int(off[i]) + int(cnt[i])
        mask = self._array(f"{modality}/mask") if self.manifest.modalities[modality].cloud_mask is not None else None
        return Series(data=self._read(self._array(f"{modality}/data"), a, b, i),
                      dates=self._read(self._array(f"{modality}/dates"), a, b, i),
                      mask=None if mask is None else self._read(mask, a, b, i))

    def _array(self, path: str) -> zarr.Array:
        """An array opened once: opening reads its metadata, one request per array and tile on a remote store."""
        if path not in self._arrays:
            self._arrays[path] = self.root[path]
        return self._arrays[path]

    def read_target(self, i: int, name: str) -> np.ndarray:
        self._check_block(i)
        return self._read(self._array(f"targets/{name}"), i, i + 1, i)[0]

    def read_tile(self, key: int | str) -> Tile:
        i = self.index(key) if isinstance(key, str) else int(key)
        if not self.valid[i]:
            raise StoreError(f"{self.path}: tile {self.tile_ids[i]!r} was skipped during the build")
        series = {m: self.read_series(i, m) for m in self.manifest.modalities}
        targets = {name: self.read_target(i, name) for name in self.manifest.targets}
        grids = georef.decode_grids(str(self._read(self._array("tiles/grids"), i, i + 1, i)[0]),
                                    f"{self.path}: tile {self.tile_ids[i]!r}")
        return Tile(tile_id=self.tile_ids[i], split=self.splits[i], fold=int(self.folds[i]),
                    lon=float(self.lon[i]), lat=float(self.lat[i]), ref_date=self.ref_dates[i],
                    series=series, targets=targets, grids=grids)

    def split_indices(self, split: str) -> np.ndarray:
        """Valid tiles of ``split`` in store order."""
        return np.asarray([i for i, (s, v) in enumerate(zip(self.splits, self.valid, strict=True)) if v and s == split],
                          dtype=np.int64)

    def subsets(self, split: str) -> tuple[np.ndarray, dict[int, int]]:
        """(nested order of tile indices, {percent: count}) of ``split``; empty when no subsets were computed."""
        if "subsets" not in self.root or split not in self.root["subsets"]:
            return np.zeros(0, np.int64), {}
        g = self.root["subsets"][split]
        return g["order"][:], {int(p): int(c) for p, c in g.attrs["counts"].items()}

    def tiers(self, split: str) -> list[tuple[str, np.ndarray]]:
        """The split cut into nested tiers: ("5", first 5 %), ("20", next up to 20 %), ("100", the rest).

        A subset of p % is the union of the tiers named <= p; without subsets the whole split is tier "100"."""
        order, counts = self.subsets(split)
        everything = self.split_indices(split)
        tiers, start = [], 0
        for p in sorted(counts):
            tiers.append((str(p), order[start:counts[p]]))
            start = counts[p]
        taken = set(order[:start].tolist())
        tiers.append(("100", np.asarray([i for i in everything if i not in taken], dtype=np.int64)))
        return tiers

    def summary(self) -> dict:
        """Tiles per split, modalities with dtypes/shapes/date counts, bytes on disk (for `maestro-data info`)."""
        splits: dict[str, int] = {}
        for s, v in zip(self.splits, self.valid, strict=True):
            if v:
                splits[s] = splits.get(s, 0) + 1
        mods = {}
        for name, spec in self.manifest.modalities.items():
            cnt = self.counts(name)[self.valid]
            mods[name] = {
                "dtype": spec.dtype, "step_shape": [spec.stored_channels, spec.tile_size, spec.tile_size],
                "dates_min": int(cnt.min()) if cnt.size else 0,
                "dates_median": float(np.median(cnt)) if cnt.size else 0,
                "dates_max": int(cnt.max()) if cnt.size else 0, "steps_total": int(cnt.sum()),
                "cloud_mask": spec.cloud_mask is not None,
            }
        size = self.location.tree_bytes()
        origin = self.split_origin()
        return {"path": str(self.path), "dataset": self.manifest.name, "manifest_sha256": self.manifest.sha256,
                "tiles": int(self.valid.sum()), "skipped": int((~self.valid).sum()), "splits": splits,
                "split_origin": origin, "splits_from": origins.describe(origin),
                "old_split_default": origins.is_old_default(origin),
                "modalities": mods, "targets": list(self.manifest.targets), "labelled": self.labelled,
                "bytes": size,
                "subsets": self.subset_summary()}

    def subset_summary(self) -> dict[str, dict[str, object]]:
        """Per split: tiles per subset percentage, and why a subset is empty when it is."""
        out: dict[str, dict[str, object]] = {}
        for split in self.manifest.splits.names:
            _, counts = self.subsets(split)
            size = len(self.split_indices(split))
            empty = {str(p): f"{p} % of {size} tiles rounds to 0" for p, c in counts.items() if c == 0}
            out[split] = {"tiles": size, "counts": {str(p): c for p, c in counts.items()}, "empty": empty}
        return out

    def split_origin(self) -> dict | None:
        """Which files decided the splits (``maestro_data.split_origin``); a ``legacy`` record for a fold-split
        store built before records existed."""
        return origins.stored_origin(self.attrs.get("provenance") or {},
                                    by_folds=self.manifest.splits.source == "folds")
