"""Verifying a shard set: every shard and sidecar present, of the index's size and sha256, sidecars well formed and
within their shards, no sample key in two shards; with ``full``, each sidecar layout equal to its shard's own tar
headers and every sample read and decoded exactly as the stream reads it (``layout.read_sample``,
``shard_table.decode_sample``) and checked against the manifest. Reads go through the access layer (retries)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from maestro_data.errors import MaestroError, ShardError
from maestro_data.manifest import Manifest
from maestro_data.stream.index_format import all_entries, parse_sidecar, sidecar_url, tile_id_of
from maestro_data.stream.layout import SampleBuffer, SampleSpan, read_sample, scan_shard, spans_from_sidecar
from maestro_data.stream.remote import AccessOptions, Missing, open_source, read_object
from maestro_data.stream.shard_read import check_manifest, check_sample, open_index, shard_url, stored_manifest
from maestro_data.stream.shard_table import decode_sample

READ = 8 << 20


def verify(location: str | Path, full: bool = False, manifest: Manifest | None = None,
           options: AccessOptions | None = None) -> list[str]:
    """Every problem of the shard set at ``location``, one line per bad shard (empty when all is well); a missing
    or malformed index is a ShardError."""
    options = options or AccessOptions()
    index, loc = open_index(location, options)
    if manifest is not None:
        check_manifest(index, manifest, loc)
    manifest = manifest or stored_manifest(index, loc)
    problems: list[str] = []
    hashes: list[np.ndarray] = []  # 64-bit digests of every key: O(samples) integers, not strings
    checked: list[tuple[str, dict]] = []
    for entry in all_entries(index):
        url = shard_url(loc, entry["url"])
        try:
            keys = _verify_shard(url, entry, manifest, full, options)
        except Missing:
            problems.append(f"{url}: missing shard")
            continue
        except MaestroError as exc:
            problems.append(str(exc) if url in str(exc) else f"{url}: {exc}")
            continue
        hashes.append(_key_hashes(keys))
        checked.append((url, entry))
    problems += _duplicates(hashes, checked, options)
    return problems


def _verify_shard(url: str, entry: dict, manifest: Manifest, full: bool, options: AccessOptions) -> tuple[str, ...]:
    with open_source(url, entry["bytes"], options) as source:
        digest, view = hashlib.sha256(), memoryview(bytearray(READ))
        for start in range(0, source.size, READ):
            part = view[:min(READ, source.size - start)]
            source.readinto(start, part)
            digest.update(part)
        if digest.hexdigest() != entry["sha256"]:
            raise ShardError(f"{url}: sha256 mismatch (corrupted)")
        where = sidecar_url(url)
        try:
            raw = read_object(where, options, entry["sidecar_bytes"], entry["sidecar_sha256"])
        except Missing:
            raise ShardError(f"{where}: missing sidecar (rewrite it: maestro-data reindex)") from None
        sidecar = parse_sidecar(raw, where, entry["samples"], entry["sha256"], tile_id_of)
        spans = spans_from_sidecar(sidecar, url, entry["bytes"])
        if full:
            _compare(url, spans, scan_shard(source))
            buffer = SampleBuffer()
            for span in spans:
                sample = decode_sample(read_sample(source, span, buffer), span, url)
                check_sample(sample, manifest, url)
                meta = sample["meta"]
                if not isinstance(meta, dict) or meta.get("tile_id") != sample["tile_id"]:
                    raise ShardError(f"{url}: key {span.key!r} does not map to the tile id of its metadata")
    return sidecar.keys


def _compare(url: str, spans: list[SampleSpan], truth: list[SampleSpan]) -> None:
    """The sidecar's layout must be exactly the one the shard's tar headers give."""
    for i, (mine, real) in enumerate(zip(spans, truth, strict=False)):
        if mine != real:
            raise ShardError(f"{url}: sidecar layout of sample {i} ({mine.key!r}) differs from the tar headers "
                             f"({real.key!r} at byte {real.start})")
    if len(spans) != len(truth):
        raise ShardError(f"{url}: holds {len(truth)} samples, its sidecar lists {len(spans)}")


def _key_hashes(keys: tuple[str, ...]) -> np.ndarray:
    raw = b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
    return np.frombuffer(raw, dtype="<u8")


def _duplicates(hashes: list[np.ndarray], checked: list[tuple[str, dict]], options: AccessOptions) -> list[str]:
    """One line per sample key found in two shards (named by re-reading the two sidecars)."""
    if not hashes:
        return []
    values = np.concatenate(hashes)
    owner = np.repeat(np.arange(len(hashes)), [len(h) for h in hashes])
    order = np.argsort(values, kind="stable")
    same = np.flatnonzero(values[order][1:] == values[order][:-1])
    out = []
    for i in same[:10]:
        a, b = int(owner[order[i]]), int(owner[order[i + 1]])
        common = set(_keys(*checked[a], options)) & set(_keys(*checked[b], options))
        for key in sorted(common):
            out.append(f"{checked[b][0]}: duplicate sample key {key!r} (also in {checked[a][0]})")
    return sorted(set(out))


def _keys(url: str, entry: dict, options: AccessOptions) -> tuple[str, ...]:
    where = sidecar_url(url)
    raw = read_object(where, options, entry["sidecar_bytes"], entry["sidecar_sha256"])
    return parse_sidecar(raw, where, entry["samples"], entry["sha256"], tile_id_of).keys
