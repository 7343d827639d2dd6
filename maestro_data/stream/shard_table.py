"""The stream's view of a shard set: the shards of a split/subset, and sequential reads of chosen samples.

The safety rules are those of ``maestro_data.stream.shard_read`` (its member rule, its npy decoder ``decode_npy``; urls
resolved relative to the index by ``shard_url``: no ``pipe:``, no absolute urls). The table is O(shards): url,
sample count, bytes and digests of each shard, from ``index.json``. A shard's keys, tile ids and member layout come
from its sidecar, fetched (and checked against the index's size and sha256) only by a process that reads the
shard, checked against the shard's size (``layout.spans_from_sidecar``) and cached per process by (url, sidecar
sha256), at most ``SPAN_CACHE_SIZE`` shards. Bytes come through the access layer (``cache.Access``: retries,
timeouts, the optional node-local cache). Each sample is read at once, its headers checked before decoding
(``layout.read_sample``: a header that disagrees with the sidecar is an error, not a misread) into a reused
buffer, and its arrays are ``np.frombuffer`` views of that buffer.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from maestro_data.errors import MaestroError, ShardError, StreamError
from maestro_data.manifest import Manifest
from maestro_data.stream.cache import Access
from maestro_data.stream.index_format import COLUMNS, parse_sidecar, shard_columns, sidecar_url, tile_id_of
from maestro_data.stream.layout import SampleBuffer, SampleSpan, direct_body, read_sample, spans_from_sidecar
from maestro_data.stream.shard_read import check_sample, decode_npy, shard_url


@dataclass(frozen=True)
class ShardTable:
    """The shards of one split/subset in order: tile ``i`` is sample ``i - starts[s]`` of shard ``s``. Per shard
    only what the index holds (no per-sample data): url, bytes, sha256 and the sidecar's bytes and sha256."""

    location: str
    urls: tuple[str, ...]
    starts: np.ndarray  # (num_shards + 1,) int64
    sizes: np.ndarray  # (num_shards,) int64 bytes
    sha256: tuple[str, ...]
    sidecar_sizes: np.ndarray  # (num_shards,) int64 bytes
    sidecar_sha256: tuple[str, ...]

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    @property
    def num_tiles(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, tile: int) -> int:
        return int(np.searchsorted(self.starts, tile, side="right")) - 1

    def url_of(self, tile: int) -> str:
        return self.urls[self.shard_of(tile)]

    def position_of(self, tile: int) -> int:
        return tile - int(self.starts[self.shard_of(tile)])


def load_table(index: dict, location: str, manifest: Manifest, split: str, subset: int) -> ShardTable:
    """The shards of ``split`` (``"pretrain"`` = the manifest's pretraining splits) restricted to ``subset`` %."""
    splits = manifest.splits.pretrain if split == "pretrain" else (split,)
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    try:
        for name in splits:
            for key, values in shard_columns(index, name, subset).items():
                columns[key] += values
        keep = [i for i, n in enumerate(columns["samples"]) if n > 0]
        urls = tuple(shard_url(location, columns["url"][i]) for i in keep)
    except MaestroError as exc:
        raise StreamError(str(exc) if location in str(exc) else f"{location}: {exc}") from exc
    if not keep:
        raise StreamError(f"{location}: split {split!r} at subset {subset} % has no samples")

    def pick(name: str) -> list:
        return [columns[name][i] for i in keep]

    starts = np.concatenate([[0], np.cumsum(pick("samples"))]).astype(np.int64)
    return ShardTable(location, urls, starts, np.asarray(pick("bytes"), np.int64), tuple(pick("sha256")),
                      np.asarray(pick("sidecar_bytes"), np.int64), tuple(pick("sidecar_sha256")))


SPAN_CACHE_SIZE = 256  # shards whose spans a process keeps (a few KiB each)


class SpanCache:
    """(url, sidecar sha256) -> the shard's spans, least recently used first out: bounded, and a shard rewritten
    at the same url under a new index gets a new entry."""

    def __init__(self, size: int = SPAN_CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[tuple[str, str], list[SampleSpan]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> list[SampleSpan] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, str], spans: list[SampleSpan]) -> None:
        self._items[key] = spans
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


_SPANS = SpanCache()  # per process: a shard's sidecar is fetched and checked once


def shard_spans(table: ShardTable, shard: int, access: Access) -> list[SampleSpan]:
    """The samples of shard ``shard`` from its sidecar (fetched, checked, cached per process)."""
    url = table.urls[shard]
    cache_key = (url, table.sidecar_sha256[shard])
    spans = _SPANS.get(cache_key)
    if spans is None:
        where = sidecar_url(url)
        raw = access.read_object(where, int(table.sidecar_sizes[shard]), table.sidecar_sha256[shard])
        samples = int(table.starts[shard + 1] - table.starts[shard])
        sidecar = parse_sidecar(raw, where, samples, table.sha256[shard], tile_id_of)
        spans = spans_from_sidecar(sidecar, url, int(table.sizes[shard]))
        _SPANS.put(cache_key, spans)
    return spans


def _decode_direct(head: memoryview, body: np.ndarray, name: str) -> np.ndarray:
    """The array of a member whose last ``body.nbytes`` bytes were read into ``body`` (``layout.read_sample``): a
    view of ``body`` when the member is an npy array of exactly ``body``'s shape and dtype, else (another shape:
    the transform must never read the memory it writes) decoded from a private copy of the member's bytes."""
    raw = memoryview(body).cast("B")
    try:
        arr = decode_npy(head, name, raw)
        if arr.shape == body.shape and arr.dtype == body.dtype and arr.flags.c_contiguous:
            return arr
    except ShardError:
        pass  # said again below, on the member's bytes
    return decode_npy(bytearray(head) + raw, name)


def decode_sample(view: memoryview, span: SampleSpan, url: str, direct: dict[str, np.ndarray] | None = None) -> dict:
    """{"__key__", "tile_id", "meta", <field>: array} from the bytes of one sample (arrays are views of them, or of
    the ``direct`` arrays that ``layout.read_sample`` read member bodies into)."""
    sample: dict = {"__key__": span.key, "tile_id": tile_id_of(span.key)}
    for name, offset, size in span.members:
        body = direct_body(direct, name, size)
        if body is not None:
            sample[name] = _decode_direct(view[offset - span.start:offset - span.start + size - body.nbytes],
                                          body, f"{url}:{span.key}.{name}.npy")
            continue
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
    """Yields (tile, key, sample, None) for requested tiles in order, or (tile, key, None, reason) for a tile that
    failed (key None when the shard's sidecar could not be read).

    Each sample is read member by member into a reused buffer (runs of consecutive samples read forward) and its
    arrays are zero-copy views of that buffer, valid until the next sample is requested (the stream copies what it
    keeps into batch rows)."""

    def __init__(self, table: ShardTable, manifest: Manifest | None, access: Access | None = None):
        self.table, self.manifest, self.access = table, manifest, access or Access()
        self._buffer = SampleBuffer()  # reused: a fresh buffer per sample costs page faults on every read

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

    def read(self, tiles: list[int], direct: dict[int, dict[str, np.ndarray]] | None = None
             ) -> Iterator[tuple[int, str | None, dict | None, str | None]]:
        """``direct``: tile -> {field: array} that receives the member's body by the read itself (see
        ``layout.read_sample``); the sample's array for that field is then a view of it."""
        for shard, run in self._runs(tiles):
            yield from self._read_run(shard, run, direct or {})

    def _read_run(self, shard: int, run: list[int], direct: dict[int, dict[str, np.ndarray]]
                  ) -> Iterator[tuple[int, str | None, dict | None, str | None]]:
        table, url = self.table, self.table.urls[shard]
        first = int(table.starts[shard])
        done, spans = 0, None
        try:
            spans = shard_spans(table, shard, self.access)
            with self.access.open_shard(url, int(table.sizes[shard]), table.sha256[shard]) as source:
                for tile in run:
                    span = spans[tile - first]
                    # the sample's arrays view the reused buffer: valid until the next sample is requested
                    into = direct.get(tile)
                    sample = decode_sample(read_sample(source, span, self._buffer, into), span, url, into)
                    done += 1
                    problem = None
                    if self.manifest is not None:
                        try:
                            check_sample(sample, self.manifest, url)
                        except MaestroError as exc:
                            problem = str(exc)
                    yield tile, span.key, (None if problem else sample), problem
        except (MaestroError, OSError, ValueError) as exc:
            reason = str(exc) if url in str(exc) else f"{url}: {exc}"
            failed = run[done] - first if done < len(run) else run[-1] - first
            where = f"sample {spans[failed].key!r}" if spans else f"sample #{failed} of the shard"
            reason = reason if where in reason else f"{reason} (while reading {where})"
            for tile in run[done:]:
                yield tile, spans[tile - first].key if spans else None, None, reason
