"""What a build wrote, file by file, so that lost or damaged store data is never read back as fill values.

zarr returns an array's fill value for a chunk file that does not exist, so a store whose chunk was deleted would
serve zeros without a word. Each writer therefore records, right after its write and before its commit marker,
every chunk or shard file it produced with its byte size and sha256 (``<store>/_integrity/<part>.json``; parts:
``plan`` for the planner's arrays, ``block-<b>`` per block of tiles, ``subsets``). A file that was legitimately
not written (a chunk holding only fill values) is simply absent from the record. Readers check presence and size
before trusting a block (cheap: one stat per file); ``verify --full`` and ``build --resume`` also checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from maestro_data.manifest import Manifest

INTEGRITY_DIR = "_integrity"


def chunk_key(array: str, first: int, ndim: int) -> str:
    """Storage key of the chunk (or shard) of ``array`` whose first grid coordinate is ``first`` (others 0)."""
    return f"{array}/c/{first}" + "/0" * (ndim - 1)


def planner_arrays(manifest: Manifest) -> list[tuple[str, int]]:
    """(array path, ndim) of the arrays the planner writes in one chunk each."""
    out = [("tiles/id", 1), ("tiles/split", 1), ("tiles/fold", 1)]
    for m in manifest.modalities:
        out += [(f"{m}/offsets", 1), (f"{m}/count", 1)]
    return out


def block_arrays(manifest: Manifest) -> list[tuple[str, int]]:
    """(array path, ndim) of the arrays whose chunk or shard number ``b`` belongs to block ``b`` alone."""
    out = [("tiles/lon", 1), ("tiles/lat", 1), ("tiles/valid", 1), ("tiles/ref_date", 2), ("tiles/grids", 1)]
    for name, spec in manifest.modalities.items():
        out += [(f"{name}/data", 4), (f"{name}/dates", 2), (f"{name}/nan_count", 1)]
        if spec.cloud_mask is not None:
            out.append((f"{name}/mask", 4))
    for name, t in manifest.targets.items():
        out.append((f"targets/{name}", 2 if t.type == "multilabel" else 3))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _part_path(store: Path, part: str) -> Path:
    return store / INTEGRITY_DIR / f"{part}.json"


def _ensure_group(folder: Path) -> None:
    """The record folder is an (empty) zarr group, so that zarr's hierarchy walks accept it."""
    folder.mkdir(exist_ok=True)
    meta = folder / "zarr.json"
    if not meta.is_file():
        tmp = folder / f"zarr.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                   "attributes": {"about": "chunk integrity records (maestro_data.integrity)"}}))
        os.replace(tmp, meta)


def record(store: Path, part: str, keys: list[str]) -> dict[str, list]:
    """Size and sha256 of every file of ``keys`` that exists, written atomically as the record of ``part``."""
    files = {}
    for key in keys:
        path = store / key
        if path.is_file():
            files[key] = [path.stat().st_size, _sha256(path)]
    target = _part_path(store, part)
    _ensure_group(target.parent)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"files": files}, sort_keys=True))
    os.replace(tmp, target)
    return files


def record_plan(store: Path, manifest: Manifest) -> None:
    record(store, "plan", [chunk_key(a, 0, n) for a, n in planner_arrays(manifest)])


def record_block(store: Path, manifest: Manifest, block: int) -> None:
    record(store, f"block-{block}", [chunk_key(a, block, n) for a, n in block_arrays(manifest)])


def record_subsets(store: Path, splits: list[str]) -> None:
    record(store, "subsets", [chunk_key(f"subsets/{s}/order", 0, 1) for s in splits])


@dataclass(frozen=True)
class Damage:
    """One file of a record that is missing, of another size, or (checksummed) of other contents."""

    part: str
    key: str
    what: str

    def describe(self, store: Path) -> str:
        return f"{store / self.key}: {self.what}"


def check(store: Path, part: str, *, full: bool = False) -> list[Damage]:
    """Damage of one recorded part; a part without a record is damage too (the writer never finished it)."""
    path = _part_path(store, part)
    try:
        files = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        return [Damage(part, f"{INTEGRITY_DIR}/{part}.json", "no integrity record (written before this toolkit "
                                                              "recorded integrity, or the write was interrupted)")]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [Damage(part, f"{INTEGRITY_DIR}/{part}.json", f"unreadable integrity record ({exc})")]
    out = []
    for key, (size, digest) in files.items():
        file = store / key
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            out.append(Damage(part, key, f"missing (written by the build, {size} bytes)"))
            continue
        if actual != size:
            out.append(Damage(part, key, f"{actual} bytes, the build wrote {size}"))
        elif full and _sha256(file) != digest:
            out.append(Damage(part, key, "sha256 differs from what the build wrote"))
    return out


def parts(store: Path, num_blocks: int, with_subsets: bool) -> list[str]:
    return ["plan", *(f"block-{b}" for b in range(num_blocks)), *(["subsets"] if with_subsets else [])]
