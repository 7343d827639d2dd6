"""Rewriting a shard set's index as the current schema without rebuilding the shards (``maestro-data reindex``).

Per shard, a sidecar is built from the shard's own tar headers (``layout.scan_shard``: no data is read), checked
against the sample keys the old index lists, and written beside the shard; the new ``index.json`` is written last,
so an interrupted reindex leaves the old index in force. Shard bytes and their sha256 are kept as the index says
(``maestro-data verify`` checks them). Schema-1 indexes (per-sample lists inline) and current ones (sidecars
rebuilt) are accepted; schema 2 (samples without georeference) needs a rebuild. Works on local folders and fsspec
urls.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm import tqdm

from maestro_data import __version__
from maestro_data.errors import ShardError
from maestro_data.stream.index_format import (
    COLUMNS,
    INDEX_FORMAT,
    INDEX_SCHEMA,
    MAX_INDEX_BYTES,
    all_entries,
    check_column,
    check_index,
    encode_sidecar,
    index_bytes,
    load_json,
    sidecar_url,
    tile_id_of,
)
from maestro_data.stream.layout import SampleSpan, scan_shard
from maestro_data.stream.remote import AccessOptions, open_source, read_object, write_object
from maestro_data.stream.shard_read import resolve_index, shard_url


def _old_entries(index: dict, where: str) -> list[dict]:
    """The shards of an index of schema 1 (or the current one) as dicts: url, samples, bytes, sha256, maybe keys."""
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{where}: not a maestro shard index")
    if index.get("schema") == INDEX_SCHEMA:
        return all_entries(check_index(index, where))
    if index.get("schema") == 2:
        check_index(index, where)  # its one-line "rebuild" message
    if index.get("schema") != 1:
        raise ShardError(f"{where}: unknown index schema version {index.get('schema')!r} (reindex reads 1 and "
                         f"{INDEX_SCHEMA})")
    splits = index.get("splits")
    if not isinstance(splits, dict):
        raise ShardError(f"{where}: field splits: expected an object")
    out = []
    for split, info in splits.items():
        tiers = info.get("tiers") if isinstance(info, dict) else None
        if not isinstance(tiers, dict):
            raise ShardError(f"{where}: field splits.{split}.tiers: expected an object")
        for tier, entries in tiers.items():
            path = f"splits.{split}.tiers.{tier}"
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ShardError(f"{where}: field {path}: expected a list of shard objects")
            columns = {name: [e.get(name) for e in entries] for name in COLUMNS[:4]}
            for name, kind in zip(COLUMNS[:4], ("url", "int", "int", "hex"), strict=True):
                check_column(where, columns[name], f"{path}.{name}", kind, None)
            out += [{"split": split, "tier": tier, **e} for e in entries]
    return out


def _sidecar(url: str, entry: dict, spans: list[SampleSpan]) -> bytes:
    """A sidecar from the header scan, after checking it against what the old index says of the shard."""
    keys = [s.key for s in spans]
    if len(spans) != entry["samples"] or keys != entry.get("keys", keys):
        raise ShardError(f"{url}: holds {len(spans)} samples whose keys differ from the {entry['samples']} the "
                         "index lists (rebuild the shards)")
    fields = [f for f, _, _ in spans[0].members] if spans else []
    layout: list[int] = []
    for span in spans:
        if [f for f, _, _ in span.members] != fields:
            raise ShardError(f"{url}: sample {span.key!r} has other members than the first sample; a sidecar "
                             "describes shards of one layout")
        layout.append(span.start)
        for _, offset, size in span.members:
            layout += [offset - span.start, size]
    return encode_sidecar(entry["sha256"], keys, [tile_id_of(k) for k in keys], fields, layout)


def reindex(location: str | Path, options: AccessOptions | None = None, quiet: bool = True) -> dict:
    """Write a sidecar per shard and a schema-2 ``index.json`` for the shard set at ``location``; returns it."""
    options = options or AccessOptions()
    loc = resolve_index(location)
    old = load_json(read_object(loc, options, max_bytes=MAX_INDEX_BYTES), loc)
    entries = _old_entries(old, loc)
    tiers = {split: {tier: {c: [] for c in COLUMNS} for tier in info["tiers"]} for split, info in old["splits"].items()}
    for entry in tqdm(entries, desc="reindex", unit="shard", disable=quiet):
        url = shard_url(loc, entry["url"])
        with open_source(url, entry["bytes"], options) as source:
            sidecar = _sidecar(url, entry, scan_shard(source))
        write_object(sidecar_url(url), sidecar, options)
        row = (entry["url"], entry["samples"], entry["bytes"], entry["sha256"], len(sidecar),
               hashlib.sha256(sidecar).hexdigest())
        columns = tiers[entry["split"]][entry["tier"]]
        for name, value in zip(COLUMNS, row, strict=True):
            columns[name].append(value)
    splits = {}
    for split, info in old["splits"].items():
        split_tiers = tiers[split]
        splits[split] = {"tiers": split_tiers, "subsets": info.get("subsets", {}),
                         "samples": sum(sum(c["samples"]) for c in split_tiers.values())}
    index = {"format": INDEX_FORMAT, "schema": INDEX_SCHEMA, "toolkit_version": __version__,
             "seed": old.get("seed", 0), "manifest": old.get("manifest"), "splits": splits,
             "labelled": old.get("labelled", True)}
    check_index(index, loc)
    write_object(loc, index_bytes(index), options)
    return index
