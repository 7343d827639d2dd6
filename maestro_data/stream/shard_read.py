"""Opening shard indexes and shards from a path or URL, safely.

An index is opened from a local path, ``file://``, ``http(s)://``, ``s3://`` or ``gs://`` through the access
layer (``remote.py``: retries, timeouts; the cloud back-ends are optional extras) and checked field by field
(``index_format.check_index``). Shard urls inside an index are relative to the index and are resolved by this
module only: a ``pipe:`` url or an absolute url in an index file is refused, so an index can never make a reader
execute anything. Tar members are checked (regular files, no ``/``, ``..`` or absolute names, only ``.npy`` and
``.json``), npy headers are bounded and parsed with ``allow_pickle=False``. ``verify.py`` checks a whole set.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from maestro_data.errors import MaestroError, ShardError
from maestro_data.manifest import Manifest, parse_manifest
from maestro_data.stream.index_format import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    check_index,
    load_json,
    relative_url_problem,
    tile_id_of,
)
from maestro_data.stream.remote import AccessOptions, Missing, SourceFile, object_size, open_source, read_object

MAX_NPY_HEADER = 4096
# the member-name rule of check_member: ``<key>.<field>.npy`` -> groups 1, 2; ``<key>.json`` -> 4
MEMBER = re.compile(r"^([A-Za-z0-9_%-]+)\.([A-Za-z0-9_]+)\.(npy)$|^([A-Za-z0-9_%-]+)\.(json)$")


def _is_url(location: str) -> bool:
    return "://" in location


def resolve_index(location: str | Path) -> str:
    """A directory or an index file, local or remote -> the index's own url/path."""
    loc = str(location)
    if loc.startswith("pipe:"):
        raise ShardError(f"{loc}: pipe: urls are not accepted")
    if not loc.endswith(".json"):
        loc = loc.rstrip("/") + "/" + INDEX_NAME
    return loc


def shard_url(index_location: str, relative: str) -> str:
    """Resolve a shard url of the index relative to the index; refuse anything that is not a plain relative path."""
    problem = relative_url_problem(relative) if isinstance(relative, str) else "is not a string"
    if problem:
        raise ShardError(f"{index_location}: shard url {relative!r} {problem}")
    base = index_location.rsplit("/", 1)[0] if "/" in index_location else "."
    return posixpath.join(base, relative) if _is_url(base) else str(Path(base) / relative)


def open_index(location: str | Path, options: AccessOptions | None = None) -> tuple[dict, str]:
    """Read and check an index (see ``index_format``); returns (index, its resolved location)."""
    loc = resolve_index(location)
    try:
        raw = read_object(loc, options or AccessOptions(), max_bytes=MAX_INDEX_BYTES)
    except Missing:
        raise ShardError(f"{loc}: no shard index (index.json is written last; was the shard writing "
                         "interrupted?)") from None
    except ShardError as exc:
        raise ShardError(f"cannot read shard index: {exc}") from exc
    return check_index(load_json(raw, loc), loc), loc


def check_manifest(index: dict, manifest: Manifest, location: str) -> None:
    """Refuse shards whose stored content differs from what ``manifest`` describes.

    Only what a build writes must agree (``Manifest.storage_sha256``): a copy of the manifest that changes what is
    applied at stream time (temporal bins, normalisation, band selection, ignored labels, ...) reads the same
    shards without a rebuild."""
    got = index["manifest"]
    built = stored_manifest(index, location)
    if built.storage_sha256 != manifest.storage_sha256:
        raise ShardError(f"{location}: shards were built from manifest {got['name']!r} ({got['sha256'][:12]}), "
                         f"whose stored modalities or targets differ from {manifest.name!r} "
                         f"({manifest.sha256[:12]})")


def stored_manifest(index: dict, location: str) -> Manifest:
    """The manifest the shards were built from (stored in the index); a bad one is a ShardError."""
    try:
        return parse_manifest(index["manifest"]["text"], origin=f"{location} (stored manifest)")
    except MaestroError as exc:
        raise ShardError(f"{location}: field manifest.text: {exc}") from exc


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # parsed headers, by their bytes
_NPY_HEADERS_MAX = 4096


def _npy_header(raw: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """dtype, shape, fortran order of an npy header, parsed by numpy with the size bound (cached by its bytes:
    the headers of a dataset repeat)."""
    cached = _NPY_HEADERS.get(raw)
    if cached is not None:
        return cached
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported npy version {version}")
    except ValueError as exc:
        raise ShardError(f"member {name}: not a valid npy array: {exc}") from exc
    if dtype.hasobject:
        raise ShardError(f"member {name}: object arrays (pickle) are refused")
    if len(_NPY_HEADERS) >= _NPY_HEADERS_MAX:  # bounded, whatever a shard holds
        _NPY_HEADERS.clear()
    _NPY_HEADERS[raw] = (dtype, tuple(shape), fortran)
    return _NPY_HEADERS[raw]


def decode_npy(data: bytes | bytearray | memoryview, name: str, body: memoryview | None = None) -> np.ndarray:
    """The array of one npy member as a view of ``data`` (no copy; read-only for bytes): the header is bounded
    (``MAX_NPY_HEADER``) and parsed by numpy, object dtypes (pickle) are refused, the body size must match.
    The one decoder of ``read_shard``/``verify`` and of the stream. ``body``: the body lies there (e.g. read
    straight into a batch row), ``data`` holds exactly the header."""
    view = memoryview(data)
    if len(view) < 10 or view[:6] != b"\x93NUMPY" or view[6] not in (1, 2, 3):
        raise ShardError(f"member {name}: not a valid npy array (bad magic)")
    prefix = 10 if view[6] == 1 else 12
    hlen = int.from_bytes(view[8:prefix], "little")
    if hlen > MAX_NPY_HEADER or prefix + hlen > len(view):
        raise ShardError(f"member {name}: not a valid npy array: header of {hlen} bytes is too long or truncated")
    dtype, shape, fortran = _npy_header(bytes(view[:prefix + hlen]), name)
    count = math.prod(shape)
    if body is None:
        body = view[prefix + hlen:]
    elif prefix + hlen != len(view):
        raise ShardError(f"member {name}: not a valid npy array: header of {hlen} bytes, {len(view)} given")
    if len(body) != count * dtype.itemsize:
        raise ShardError(f"member {name}: npy body of {len(body)} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


def check_member(member: tarfile.TarInfo, origin: str, previous: str | None, seen: set[str]) -> tuple[str, str]:
    """THE tar member rule of every reader (``iter_samples`` and the stream's header scan): a regular file named
    ``<key>.<field>.npy`` or ``<key>.json`` without a path, the field ``json`` reserved for the metadata, and no key
    that starts a second sample. Returns (key, field), field ``"json"`` for the metadata; a key other than
    ``previous`` (the current sample's) starts a sample and is added to ``seen``."""
    name = member.name
    if not member.isfile():
        raise ShardError(f"{origin}: member {name!r} is not a regular file (links are refused)")
    match = MEMBER.match(name)
    if "/" in name or name.startswith("..") or not match:
        raise ShardError(f"{origin}: member name {name!r} is not <key>.<field>.npy or <key>.json "
                         "(path traversal and pickle members are refused)")
    if match.group(2) == "json":  # would be taken for the sample's metadata by the stream
        raise ShardError(f"{origin}: member name {name!r}: the field name 'json' is reserved for <key>.json")
    key = match.group(1) or match.group(4)
    if key != previous:
        if key in seen:
            raise ShardError(f"{origin}: duplicate sample key {key!r}")
        seen.add(key)
    return key, match.group(2) or "json"


def iter_samples(fileobj, origin: str) -> Iterator[dict]:
    """Samples of one tar stream: {"__key__", "tile_id", "meta", <field>: array}; members checked by
    :func:`check_member`, no pickle."""
    current: dict | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                key, field = check_member(member, origin, current and current["__key__"], seen)
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "tile_id": tile_id_of(key)}
                data = tar.extractfile(member).read()
                if field == "json":
                    try:
                        current["meta"] = json.loads(data)
                    except json.JSONDecodeError as exc:
                        raise ShardError(f"{origin}: member {member.name}: invalid JSON: {exc}") from exc
                else:
                    current[field] = decode_npy(data, f"{origin}:{member.name}")
    except tarfile.TarError as exc:
        raise ShardError(f"{origin}: corrupt or truncated tar: {exc}") from exc
    except EOFError as exc:
        raise ShardError(f"{origin}: truncated tar: {exc}") from exc
    if current is not None:
        yield current


def read_shard(url: str, options: AccessOptions | None = None) -> Iterator[dict]:
    """Samples of one shard (local path or fsspec url, read through the access layer), in tar order."""
    options = options or AccessOptions()
    with open_source(url, object_size(url, options), options) as source:
        yield from iter_samples(SourceFile(source), url)


def check_sample(sample: dict, manifest: Manifest, origin: str) -> None:
    """Shapes and dtypes of a decoded sample against the manifest."""
    key = sample["__key__"]
    if "meta" not in sample:
        raise ShardError(f"{origin}: sample {key!r} has no metadata JSON")
    for name, spec in manifest.modalities.items():
        for field in (name, f"{name}_dates") + ((f"{name}_mask",) if spec.cloud_mask else ()):
            if field not in sample:
                raise ShardError(f"{origin}: sample {key!r} lacks {field!r}, which the manifest requires")
        data, dates = sample[name], sample[f"{name}_dates"]
        step = (spec.stored_channels, spec.tile_size, spec.tile_size)
        if data.ndim != 4 or data.shape[1:] != step or data.dtype != np.dtype(spec.dtype):
            raise ShardError(f"{origin}: sample {key!r} {name}: {data.dtype}{tuple(data.shape)}, expected "
                             f"{spec.dtype}(T, {step[0]}, {step[1]}, {step[2]})")
        if dates.shape != (data.shape[0], 3):
            raise ShardError(f"{origin}: sample {key!r} {name}_dates: shape {dates.shape}, expected "
                             f"({data.shape[0]}, 3)")
    for name in manifest.targets:
        if name not in sample:
            raise ShardError(f"{origin}: sample {key!r} lacks target {name!r}")
