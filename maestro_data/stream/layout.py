"""Where the samples of a shard lie (from its sidecar, or from a scan of its tar headers), and reading one sample
with every member's tar header checked against the layout before any member is decoded.

A layout is trusted only as far as it is checked: every offset and size within the shard's byte size, headers on
512-byte blocks, at most ``MAX_HEADER_BYTES`` of padding and header between members, samples in order without
overlap (``spans_from_sidecar``, before any read); then, once a sample's bytes are read, the tar header in front of
each member must name that member with that size (``read_sample``). So no untrusted number sizes an allocation
beyond the shard, and a shard changed after it was indexed is refused, not misread.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import numpy as np

from maestro_data.errors import MaestroError, ShardError
from maestro_data.stream.index_format import Sidecar
from maestro_data.stream.remote import ByteSource, SourceFile
from maestro_data.stream.shard_read import check_member

BLOCK = tarfile.BLOCKSIZE
MAX_HEADER_BYTES = 64 << 10  # padding + (PAX) headers between two members; ours are 512 bytes or a few blocks


@dataclass(frozen=True)
class SampleSpan:
    """Where one sample lies in its shard: [start, end) bytes and its members as (field, data offset, size)."""

    key: str
    start: int
    end: int
    members: tuple[tuple[str, int, int], ...]


def member_name(key: str, field: str) -> str:
    return f"{key}.json" if field == "json" else f"{key}.{field}.npy"


def spans_from_sidecar(sidecar: Sidecar, url: str, shard_bytes: int) -> list[SampleSpan]:
    """The samples of a shard from its sidecar, the layout checked against the shard's size and tar's block
    structure (see the module docstring); a violation is one ShardError naming the shard and the sample."""
    layout = sidecar.layout
    if not len(layout):
        return []
    starts, rel, sizes = layout[:, 0], layout[:, 1::2], layout[:, 2::2]
    too_big = (layout > shard_bytes).any(axis=1)  # first, so that the sums below cannot overflow
    offsets = starts[:, None] + rel
    ends = offsets + sizes
    gaps = np.concatenate([rel[:, :1], offsets[:, 1:] - ends[:, :-1]], axis=1)
    sample_ends = ends[:, -1]
    previous_ends = np.concatenate([[0], sample_ends[:-1]])
    problems = (
        (too_big, f"offsets or sizes beyond the shard's {shard_bytes} bytes"),
        (sample_ends > shard_bytes, f"members that end beyond the shard's {shard_bytes} bytes"),
        ((starts % BLOCK != 0) | (offsets % BLOCK != 0).any(axis=1), "tar headers off the 512-byte blocks"),
        (((gaps < BLOCK) | (gaps > MAX_HEADER_BYTES)).any(axis=1),
         f"members not separated by one tar header (512 to {MAX_HEADER_BYTES} bytes)"),
        (starts < previous_ends, "a start before the end of the previous sample (overlap)"),
    )
    for bad, what in problems:
        if bad.any():
            i = int(np.argmax(bad))
            raise ShardError(f"{url}: sidecar layout of sample {sidecar.keys[i]!r} has {what}: "
                             f"{layout[i].tolist()[:7]}{'...' if layout.shape[1] > 7 else ''}")
    fields = sidecar.fields
    return [SampleSpan(key, int(s), int(e), tuple(zip(fields, o.tolist(), z.tolist(), strict=True)))
            for key, s, e, o, z in zip(sidecar.keys, starts, sample_ends, offsets, sizes, strict=True)]


def scan_shard(source: ByteSource) -> list[SampleSpan]:
    """Every sample of a shard from its tar headers (no data is read), each member checked by
    ``shard_read.check_member``: the truth a sidecar is built from (``reindex``) and checked against (``verify``)."""
    spans: list[SampleSpan] = []
    key, start, members = None, 0, []
    seen: set[str] = set()

    def close() -> None:
        if key is not None:
            spans.append(SampleSpan(key, start, members[-1][1] + members[-1][2], tuple(members)))

    url = source.url
    try:
        with tarfile.open(fileobj=SourceFile(source), mode="r:") as tar:
            for member in tar:
                k, field = check_member(member, url, key, seen)
                if k != key:
                    close()
                    key, start, members = k, member.offset, []
                members.append((field, member.offset_data, member.size))
    except MaestroError as exc:
        raise ShardError(f"{exc} (after sample {key!r})") from exc
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ShardError(f"{url}: corrupt or truncated tar (after sample {key!r}): {exc}") from exc
    close()
    return spans


def _ustar_matches(block: bytes, name: bytes, size: int, total: int | None = None) -> bool:
    """Whether one ustar header block names regular file ``name`` of ``size`` bytes with a valid checksum: the
    common case, checked in a few microseconds (``tarfile.TarInfo.frombuf`` takes ~80 per member). ``total``:
    the block's byte sum less its checksum field, when the caller computed it (``read_sample``: one numpy
    reduction for all the headers of a sample instead of a Python sum per header)."""
    if total is None:
        total = sum(block) - sum(block[148:156])
    try:
        return (block[:len(name)] == name and block[len(name)] == 0 and block[345] == 0 and block[156] in b"0\0"
                and int(block[124:136].split(b"\0", 1)[0] or b"-1", 8) == size
                and int(block[148:156].split(b"\0", 1)[0], 8) == total + 256)
    except ValueError:
        return False


def _header_problem(region: bytes, name: str, size: int, total: int | None = None) -> str | None:
    """Why the tar header(s) in ``region`` (ending where the member's data starts) do not describe member ``name``
    of ``size`` bytes; None when they do. One ustar block is checked directly (``total``: see ``_ustar_matches``),
    anything else (PAX, or a mismatch to explain) is parsed by tarfile."""
    encoded = name.encode()
    if len(region) == BLOCK and len(encoded) < 100 and _ustar_matches(region, encoded, size, total):
        return None
    try:
        if len(region) == BLOCK:
            info = tarfile.TarInfo.frombuf(region, "utf-8", "surrogateescape")
        else:
            with tarfile.TarFile(fileobj=io.BytesIO(region), mode="r") as tar:
                info = tar.firstmember
            if info is None or info.offset_data != len(region):
                return "is not one member's header"
    except (tarfile.TarError, EOFError, ValueError) as exc:
        return f"is not a tar header ({exc})"
    if not info.isreg() or info.name != name or info.size != size:
        return f"describes {info.name!r} of {info.size} bytes"
    return None


class SampleBuffer:
    """The reused bytes of the sample being read: grown only to sizes that tar headers have confirmed."""

    def __init__(self) -> None:
        self.data = bytearray()

    def view(self, start: int, end: int, keep: int) -> memoryview:
        if len(self.data) < end:
            grown = bytearray(max(end, 2 * len(self.data)))
            grown[:keep] = memoryview(self.data)[:keep]
            self.data = grown
        return memoryview(self.data)[start:end]


def direct_body(direct: dict[str, np.ndarray] | None, field: str, size: int) -> np.ndarray | None:
    """The array of ``direct`` that receives the last bytes of member ``field`` of ``size`` bytes, or None: THE
    rule of both ``read_sample`` and ``stream_read.decode_sample`` (room is left for an npy header)."""
    body = direct.get(field) if direct else None
    return body if body is not None and 0 < body.nbytes <= size - 11 else None


def read_sample(source: ByteSource, span: SampleSpan, buffer: SampleBuffer,
                direct: dict[str, np.ndarray] | None = None) -> memoryview:
    """The bytes [span.start, span.end) of one sample, read at once, then the header in front of each member must
    name it with its size before any member is decoded (a failure is a ShardError naming shard and sample). One
    read per sample, not two per member: ~30 small reads and per-header Python sums cost more than the copy.
    The span was checked against the shard's size (``spans_from_sidecar``), so it bounds the buffer as before.

    ``direct``: field -> a C-contiguous array (a batch row) that receives the LAST ``nbytes`` bytes of that member
    (its npy body when the header says so; ``stream_read.decode_sample`` checks): the row is then written by the
    read itself, not by a second copy out of this buffer (whose bytes there are left stale)."""
    base = span.start
    data = buffer.view(0, span.end - base, keep=0)
    pos = base
    for field, offset, size in span.members:  # ``direct`` bodies land in the caller's arrays, the rest here
        body = direct_body(direct, field, size)
        if body is not None:
            source.readinto(pos, data[pos - base:offset + size - body.nbytes - base])
            source.readinto(offset + size - body.nbytes, memoryview(body).cast("B"))
            pos = offset + size
    source.readinto(pos, data[pos - base:])
    # the last header block before each member: its byte sums (less the checksum field) in one reduction
    blocks = np.frombuffer(data, np.uint8)[np.asarray([o - base - BLOCK for _, o, _ in span.members])[:, None]
                                            + np.arange(BLOCK)]
    totals = (blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64)).tolist()
    pos = base
    for (field, offset, size), total in zip(span.members, totals, strict=True):
        name = member_name(span.key, field)
        region = bytes(data[pos - base + (-pos) % BLOCK:offset - base])
        problem = _header_problem(region, name, size, total if len(region) == BLOCK else None)
        if problem:
            raise ShardError(f"{source.url}: sample {span.key!r}: the tar header before byte {offset} {problem}; "
                             f"the sidecar says {name!r} of {size} bytes (shard changed after indexing? run "
                             "maestro-data verify)")
        pos = offset + size
    return data
