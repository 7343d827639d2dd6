"""One tile as the stream sees it: its decoded shard sample (from a tile store or a shard index), and what the
loader makes of it for (mode, seed, epoch, crop) through the loader's own transform and device transfer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from maestro_data.build.shards import sample_members
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import ManifestError, ShardError, StreamError
from maestro_data.manifest import Manifest, load_manifest
from maestro_data.stream.collate import BatchBuffer, SampleTransform
from maestro_data.stream.device import to_model_batch
from maestro_data.stream.index_format import INDEX_NAME, all_entries, parse_sidecar, sidecar_url, tile_id_of
from maestro_data.stream.loader import StreamConfig
from maestro_data.stream.remote import AccessOptions, read_object
from maestro_data.stream.shard_read import MEMBER, decode_npy, open_index, read_shard, shard_url, stored_manifest


def is_index(location: str | Path) -> bool:
    """A shard index (folder with index.json, the file itself, or a URL) rather than a tile store."""
    loc = str(location)
    return "://" in loc or loc.endswith(".json") or (Path(loc) / INDEX_NAME).is_file()


def sample_from_store(store: TileStore, tile_id: str) -> dict:
    """The tile's sample exactly as its shard holds it: the shard writer's members, decoded by the shard reader."""
    tile = store.read_tile(tile_id)
    sample: dict = {}
    for name, data in sample_members(tile, store.manifest.name):
        match = MEMBER.match(name)
        if match.group(4):
            sample.update({"__key__": match.group(4), "tile_id": tile.tile_id, "meta": json.loads(data)})
        else:
            sample[match.group(2)] = decode_npy(data, name)
    return sample


def sample_from_index(location: str, tile_id: str) -> tuple[dict, Manifest]:
    """The tile's sample read from the one shard whose sidecar lists it, and the index's manifest (sidecars are
    small: the shards themselves are not read until the tile is found)."""
    index, loc = open_index(location)
    manifest = stored_manifest(index, loc)
    options = AccessOptions()
    for entry in all_entries(index):
        url = shard_url(loc, entry["url"])
        raw = read_object(sidecar_url(url), options, size=entry["sidecar_bytes"], sha256=entry["sidecar_sha256"])
        sidecar = parse_sidecar(raw, sidecar_url(url), entry["samples"], entry["sha256"], tile_id_of)
        if tile_id in sidecar.tile_ids:
            for sample in read_shard(url, options):
                if sample["tile_id"] == tile_id:
                    return sample, manifest
    raise ShardError(f"{loc}: no tile {tile_id!r} in any shard of the index")


def load_sample(location: str | Path, tile_id: str) -> tuple[dict, Manifest]:
    """(sample, manifest it was built with) from a tile store (the primary path) or a shard index."""
    if is_index(location):
        return sample_from_index(str(location), tile_id)
    store = TileStore(location)
    return sample_from_store(store, tile_id), store.manifest


def display_manifest(built: Manifest, chosen: str | Path | None = None) -> Manifest:
    """The manifest to look through: ``chosen`` (name or file, which must describe the same stored data), else the
    one the data was built with; when that one predates the display keys (no colours, no views), the built-in
    manifest of that dataset if it is the same one (same digest: the digests leave display keys out)."""
    if chosen is not None:
        manifest = load_manifest(chosen)
        if manifest.storage_sha256 != built.storage_sha256:
            raise ManifestError(f"{chosen}: describes other stored data than the manifest {built.name!r} the tile "
                                "was built with (modalities, dtypes, bands or classes differ)")
        return manifest
    if any(s.display for s in built.modalities.values()) or any(t.colors for t in built.targets.values()):
        return built
    try:
        builtin = load_manifest(built.name)
    except ManifestError:
        return built
    return builtin if builtin.sha256 == built.sha256 else built


def model_sample(sample: dict, manifest: Manifest, mode: str = "train", seed: int = 0, epoch: int = 0,
                 crop: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """What the model receives for element (sample, ``crop``) in ``epoch``: the loader's transform with the
    loader's defaults (``StreamConfig``), one batch row moved by ``to_model_batch`` to the CPU; and the D4 element
    that was applied. Temporal selection, crop and D4 draw from ``sample_rng(seed, epoch, key, ...)``, as in the
    loader, so this is the row the loader yields for that tile, whatever the ranks and workers."""
    options = StreamConfig(index="", split="train", mode=mode, seed=seed).transform_options()
    transform = SampleTransform(manifest, options)
    if not 0 <= crop < transform.repeats:
        raise StreamError(f"{manifest.name}: crop {crop} is not one of the {transform.repeats} crops of a tile "
                          f"(0..{transform.repeats - 1})")
    buffer = BatchBuffer(transform.output_spec(), 1, options.d4_on_device)
    buffer.fill(0, transform, sample, crop, epoch, sample["tile_id"])
    batch = buffer.as_dict()
    d4 = int(batch["d4"][0]) if "d4" in batch else 0
    moved = to_model_batch(batch, manifest, "cpu", non_blocking=False)
    return {k: v[0].numpy() for k, v in moved.items() if isinstance(v, torch.Tensor)}, d4
