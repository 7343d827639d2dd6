"""The stream's view of a shard set: the tile table of a split/subset, and sequential reads of chosen samples.

The safety rules are those of ``maestro_data.shard_read`` (its member-name pattern and npy header bound are reused):
regular files only, ``<key>.<field>.npy`` / ``<key>.json`` names without paths, bounded npy headers parsed by numpy,
object dtypes (pickle) refused, urls resolved relative to the index by ``shard_url`` (no ``pipe:``, no absolute
urls). For speed the hot path does not go through ``tarfile``'s stream reader (10 KiB reads, two copies per
member): a shard's tar headers are scanned once per process (no data read), then each sample is one read of its
byte range and its arrays are ``np.frombuffer`` views of that buffer.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np

from maestro_data.errors import MaestroError, StreamError
from maestro_data.manifest import Manifest
from maestro_data.shard_read import _MEMBER, MAX_NPY_HEADER, check_sample, shard_url
from maestro_data.shards import shard_entries, tile_id_of


@dataclass(frozen=True)
class ShardTable:
    """The tiles of one split/subset in shard order: tile ``i`` is sample ``i - starts[s]`` of shard ``s``."""

    location: str
    urls: tuple[str, ...]
    starts: np.ndarray  # (num_shards + 1,) int64
    keys: tuple[str, ...]
    tile_ids: tuple[str, ...]

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
    urls, counts, keys, ids = [], [], [], []
    try:
        for name in splits:
            for entry in shard_entries(index, name, subset):
                if not (len(entry["keys"]) == len(entry["tile_ids"]) == entry["samples"]):
                    raise StreamError(f"{location}: shard {entry['url']} lists {len(entry['keys'])} keys for "
                                      f"{entry['samples']} samples")
                if entry["samples"] == 0:
                    continue
                urls.append(shard_url(location, entry["url"]))
                counts.append(entry["samples"])
                keys += entry["keys"]
                ids += entry["tile_ids"]
    except MaestroError as exc:
        raise StreamError(str(exc)) from exc
    if not keys:
        raise StreamError(f"{location}: split {split!r} at subset {subset} % has no samples")
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ShardTable(location, tuple(urls), starts, tuple(keys), tuple(ids))


@dataclass(frozen=True)
class SampleSpan:
    """Where one sample lies in its shard: [start, end) bytes and its members as (field, data offset, size)."""

    key: str
    start: int
    end: int
    members: tuple[tuple[str, int, int], ...]


def scan_shard(url: str) -> list[SampleSpan]:
    """Every sample of a shard from a header-only pass (no data is read), with shard_read's member rules:
    regular files only, names ``<key>.<field>.npy`` or ``<key>.json`` without paths, no duplicate keys."""
    spans: list[SampleSpan] = []
    key, start, members = None, 0, []
    seen: set[str] = set()

    def close() -> None:
        if key is not None:
            spans.append(SampleSpan(key, start, members[-1][1] + members[-1][2], tuple(members)))

    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                name = member.name
                match = _MEMBER.match(name)
                if not member.isfile():
                    raise StreamError(f"{url}: member {name!r} is not a regular file (links are refused)")
                if "/" in name or not match:
                    raise StreamError(f"{url}: member name {name!r} is not <key>.<field>.npy or <key>.json "
                                      "(path traversal and pickle members are refused)")
                k = match.group(1) or match.group(4)
                if k != key:
                    close()
                    if k in seen:
                        raise StreamError(f"{url}: duplicate sample key {k!r}")
                    seen.add(k)
                    key, start, members = k, member.offset, []
                members.append((match.group(2) or "json", member.offset_data, member.size))
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise StreamError(f"{url}: corrupt or truncated tar (after sample {key!r}): {exc}") from exc
    close()
    return spans


_SCANS: dict[str, list[SampleSpan]] = {}  # per process: a shard is scanned once, then read by byte ranges
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def _npy_header(raw: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """dtype, shape, fortran order of an npy header (parsed by numpy with a size bound, cached by its bytes)."""
    if raw not in _NPY_HEADERS:
        f = io.BytesIO(raw)
        try:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f, max_header_size=MAX_NPY_HEADER)
        except ValueError as exc:
            raise StreamError(f"member {name}: not a valid npy array: {exc}") from exc
        if dtype.hasobject:
            raise StreamError(f"member {name}: object arrays (pickle) are refused")
        _NPY_HEADERS[raw] = (dtype, tuple(shape), fortran)
    return _NPY_HEADERS[raw]


def decode_npy(view: memoryview, name: str) -> np.ndarray:
    """A read-only array over ``view`` (no copy); the header is bounded and object dtypes are refused."""
    if len(view) < 10 or bytes(view[:6]) != b"\x93NUMPY" or view[6] not in (1, 2, 3):
        raise StreamError(f"member {name}: not a valid npy array (bad magic)")
    wide = view[6] != 1
    prefix = 12 if wide else 10
    hlen = int.from_bytes(view[8:prefix], "little")
    if hlen > MAX_NPY_HEADER or prefix + hlen > len(view):
        raise StreamError(f"member {name}: npy header of {hlen} bytes is too long or truncated")
    dtype, shape, fortran = _npy_header(bytes(view[:prefix + hlen]), name)
    count = int(np.prod(shape)) if shape else 1
    body = view[prefix + hlen:]
    if len(body) != count * dtype.itemsize:
        raise StreamError(f"member {name}: npy body of {len(body)} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


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
            if url not in _SCANS:
                _SCANS[url] = scan_shard(url)
            spans = _SCANS[url]
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
                    sample = decode_sample(self._read_into(f, span.end - span.start), span, url)
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
