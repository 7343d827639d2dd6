"""The stream's view of a shard set: the tile table of a split/subset, and sequential reads of chosen samples.

The safety rules are those of ``maestro_data.shard_read`` (its member rule ``check_member``, its ``FIELD`` name
rule and its npy decoder ``decode_npy`` are reused, not copied): regular files only, ``<key>.<field>.npy`` /
``<key>.json`` names without paths, bounded npy headers parsed by numpy, object dtypes (pickle) refused, urls
resolved relative to the index by ``shard_url`` (no ``pipe:``, no absolute urls). For speed the hot path does not
go through ``tarfile``'s stream reader (10 KiB reads, two copies per member): each sample is one read of its byte
range and its arrays are ``np.frombuffer`` views of that buffer. The byte ranges come from the index's
``members`` layout (``shards.py``; checked here: field names, bounds, order) or, for indexes without it, from one
scan of the shard's tar headers per process (no data read). Both are cached per process by (url, the index's
sha256 of the shard), at most ``SPAN_CACHE_SIZE`` shards: a shard rewritten at the same url with a new index is
never read with the offsets of its former self.
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np

from maestro_data.errors import MaestroError, StreamError
from maestro_data.manifest import Manifest
from maestro_data.shard_read import FIELD, check_member, check_sample, decode_npy, shard_url
from maestro_data.shards import shard_entries, tile_id_of


@dataclass(frozen=True)
class ShardTable:
    """The tiles of one split/subset in shard order: tile ``i`` is sample ``i - starts[s]`` of shard ``s``."""

    location: str
    urls: tuple[str, ...]
    starts: np.ndarray  # (num_shards + 1,) int64
    keys: tuple[str, ...]
    tile_ids: tuple[str, ...]
    layouts: tuple[dict | None, ...] = ()  # per shard: the index's "members" layout, or None (scan the headers)
    digests: tuple[str | None, ...] = ()  # per shard: the index's sha256 (keys the per-process span cache)

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    @property
    def num_tiles(self) -> int:
        return len(self.keys)

    def shard_of(self, tile: int) -> int:
        return int(np.searchsorted(self.starts, tile, side="right")) - 1

    def url_of(self, tile: int) -> str:
        return self.urls[self.shard_of(tile)]


def load_table(index: dict, location: str, manifest: Manifest, split: str, subset: int) -> ShardTable:
    """The shards of ``split`` (``"pretrain"`` = the manifest's pretraining splits) restricted to ``subset`` %."""
    splits = manifest.splits.pretrain if split == "pretrain" else (split,)
    urls, counts, keys, ids, layouts, digests = [], [], [], [], [], []
    try:
        for name in splits:
            for entry in shard_entries(index, name, subset):
                if not (len(entry["keys"]) == len(entry["tile_ids"]) == entry["samples"]):
                    raise StreamError(f"{location}: shard {entry['url']} lists {len(entry['keys'])} keys for "
                                      f"{entry['samples']} samples")
                if entry["samples"] == 0:
                    continue
                urls.append(shard_url(location, entry["url"]))
                layouts.append(entry.get("members"))
                digests.append(entry.get("sha256"))
                counts.append(entry["samples"])
                keys += entry["keys"]
                ids += entry["tile_ids"]
    except MaestroError as exc:
        raise StreamError(str(exc) if location in str(exc) else f"{location}: {exc}") from exc
    if not keys:
        raise StreamError(f"{location}: split {split!r} at subset {subset} % has no samples")
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ShardTable(location, tuple(urls), starts, tuple(keys), tuple(ids), tuple(layouts), tuple(digests))


@dataclass(frozen=True)
class SampleSpan:
    """Where one sample lies in its shard: [start, end) bytes and its members as (field, data offset, size)."""

    key: str
    start: int
    end: int
    members: tuple[tuple[str, int, int], ...]


def scan_shard(url: str) -> list[SampleSpan]:
    """Every sample of a shard from a header-only pass (no data is read), each member checked by
    ``shard_read.check_member`` (the rule of ``read_shard``); a violation is a StreamError naming shard and key."""
    spans: list[SampleSpan] = []
    key, start, members = None, 0, []
    seen: set[str] = set()

    def close() -> None:
        if key is not None:
            spans.append(SampleSpan(key, start, members[-1][1] + members[-1][2], tuple(members)))

    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                k, field = check_member(member, url, key, seen)
                if k != key:
                    close()
                    key, start, members = k, member.offset, []
                members.append((field, member.offset_data, member.size))
    except MaestroError as exc:
        raise StreamError(f"{exc} (after sample {key!r})") from exc
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise StreamError(f"{url}: corrupt or truncated tar (after sample {key!r}): {exc}") from exc
    close()
    return spans


SPAN_CACHE_SIZE = 256  # shards whose spans a process keeps (a few KiB each)


class SpanCache:
    """(url, index sha256) -> (spans, from the index layout and not yet confirmed by the headers), least recently
    used first out: bounded, and a shard rewritten at the same url under a new index gets a new entry."""

    def __init__(self, size: int = SPAN_CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[tuple[str, str | None], tuple[list[SampleSpan], bool]] = OrderedDict()

    def get(self, key: tuple[str, str | None]) -> tuple[list[SampleSpan], bool] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, str | None], spans: list[SampleSpan], from_layout: bool) -> None:
        self._items[key] = (spans, from_layout)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


_SPANS = SpanCache()  # per process: a shard is scanned (or its layout checked) once


def _headers_match(view: memoryview, span: SampleSpan) -> bool:
    """Whether the tar header in front of every member of ``span`` (in the sample's bytes ``view``) names that
    member: the index layout is trusted only where the shard's own headers agree (a ustar header, as written by
    ``shards.py``; anything else, e.g. a PAX long name, makes the reader fall back to a header scan)."""
    for field, offset, _ in span.members:
        name = (f"{span.key}.json" if field == "json" else f"{span.key}.{field}.npy").encode()
        at = offset - span.start - tarfile.BLOCKSIZE
        if at < 0 or len(name) >= 100 or view[at:at + len(name) + 1] != name + b"\0":
            return False
    return True


def spans_from_layout(url: str, layout: dict, keys: list[str] | tuple[str, ...]) -> list[SampleSpan]:
    """The samples of a shard from the index's ``members`` layout (see ``shards.py``), checked like a header scan:
    field names by ``shard_read.FIELD``, non-negative sizes, members in order inside their sample, samples in
    order without overlap, one layout per key."""
    try:
        fields = list(layout["fields"])
        rows = layout["samples"]
        bad = [f for f in fields if not isinstance(f, str) or not FIELD.match(f)]
        if bad or len(set(fields)) != len(fields) or not fields:
            raise StreamError(f"{url}: index layout has invalid field names {bad or fields!r}")
        if len(rows) != len(keys):
            raise StreamError(f"{url}: index layout lists {len(rows)} samples for {len(keys)} keys")
        spans, previous_end = [], 0
        for key, row in zip(keys, rows, strict=True):
            if len(row) != 1 + 2 * len(fields) or not all(isinstance(v, int) and v >= 0 for v in row):
                raise StreamError(f"{url}: index layout of sample {key!r} is not [start, offset, size, ...]")
            start = row[0]
            members = tuple((f, start + row[1 + 2 * i], row[2 + 2 * i]) for i, f in enumerate(fields))
            position = start
            for _, offset, size in members:
                if offset < position:
                    raise StreamError(f"{url}: index layout of sample {key!r} has overlapping members")
                position = offset + size
            if start < previous_end:
                raise StreamError(f"{url}: index layout of sample {key!r} overlaps the previous sample")
            spans.append(SampleSpan(key, start, position, members))
            previous_end = position
        return spans
    except (KeyError, TypeError) as exc:
        raise StreamError(f"{url}: malformed index layout: {exc!r}") from exc


def decode_sample(view: memoryview, span: SampleSpan, url: str) -> dict:
    """{"__key__", "tile_id", "meta", <field>: array} from the bytes of one sample (arrays are views of them)."""
    sample: dict = {"__key__": span.key, "tile_id": tile_id_of(span.key)}
    for name, offset, size in span.members:
        part = view[offset - span.start:offset - span.start + size]
        if len(part) != size:
            raise StreamError(f"{url}: sample {span.key!r} is truncated")
        if name == "json":
            try:
                sample["meta"] = json.loads(bytes(part))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise StreamError(f"{url}: sample {span.key!r}: invalid JSON: {exc}") from exc
        else:
            sample[name] = decode_npy(part, f"{url}:{span.key}.{name}.npy")
    return sample


class ShardReader:
    """Yields (tile, sample, None) for requested tiles in order, or (tile, None, reason) for a tile that failed.

    A shard is scanned once per process (headers only); each sample is then ONE read of its byte range into a
    reused buffer (runs of consecutive samples read forward without seeking) and its arrays are zero-copy views of
    that buffer, valid until the next sample is requested (the stream copies what it keeps into batch rows)."""

    def __init__(self, table: ShardTable, manifest: Manifest | None):
        self.table, self.manifest = table, manifest
        self._buffer = bytearray()  # reused: a fresh buffer per sample costs page faults on every read

    def _read_into(self, f, size: int) -> memoryview:
        if len(self._buffer) < size:
            self._buffer = bytearray(max(size, 2 * len(self._buffer)))
        view = memoryview(self._buffer)[:size]
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        return view[:got]

    def _runs(self, tiles: list[int]) -> Iterator[tuple[int, list[int]]]:
        run: list[int] = []
        shard = -1
        for t in tiles:
            s = self.table.shard_of(t)
            if run and (s != shard or t != run[-1] + 1):
                yield shard, run
                run = []
            shard = s
            run.append(t)
        if run:
            yield shard, run

    def read(self, tiles: list[int]) -> Iterator[tuple[int, dict | None, str | None]]:
        for shard, run in self._runs(tiles):
            yield from self._read_run(shard, run)

    def _read_run(self, shard: int, run: list[int]) -> Iterator[tuple[int, dict | None, str | None]]:
        table, url = self.table, self.table.urls[shard]
        first = int(table.starts[shard])
        done = 0
        try:
            layout = table.layouts[shard] if table.layouts else None
            cache_key = (url, table.digests[shard] if table.digests else None)
            cached = _SPANS.get(cache_key)
            if cached is None:
                cached = (spans_from_layout(url, layout, table.keys[first:int(table.starts[shard + 1])])
                          if layout is not None else scan_shard(url)), layout is not None
                _SPANS.put(cache_key, *cached)
            spans, from_layout = cached
            with fsspec.open(url, "rb") as f:
                position = -1
                for tile in run:
                    key = table.keys[tile]
                    i = tile - first
                    if i >= len(spans):
                        raise StreamError(f"{url}: holds {len(spans)} samples, the index lists sample {key!r} "
                                          f"at position {i}")
                    span = spans[i]
                    if span.key != key:
                        raise StreamError(f"{url}: found sample {span.key!r} where the index lists {key!r}")
                    if position != span.start:
                        f.seek(span.start)
                    position = span.end
                    # the sample's arrays view the reused buffer: valid until the next sample is requested
                    view = self._read_into(f, span.end - span.start)
                    if from_layout and not _headers_match(view, span):
                        # the shard differs from its index (rewritten after indexing?): trust only its headers
                        _SPANS.put(cache_key, scan_shard(url), False)
                        yield from self._read_run(shard, run[done:])
                        return
                    sample = decode_sample(view, span, url)
                    done += 1
                    problem = None
                    if self.manifest is not None:
                        try:
                            check_sample(sample, self.manifest, url)
                        except MaestroError as exc:
                            problem = str(exc)
                    yield tile, (None if problem else sample), problem
        except (MaestroError, OSError, ValueError) as exc:
            key = table.keys[run[done]] if done < len(run) else table.keys[run[-1]]
            reason = str(exc) if url in str(exc) else f"{url}: {exc}"
            if f"{key!r}" not in reason:
                reason += f" (while reading sample {key!r})"
            for tile in run[done:]:
                yield tile, None, reason
