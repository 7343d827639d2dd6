"""The one access layer for indexes, sidecars and shards: local files, or any fsspec url with retries and timeouts.

Remote reads are byte ranges (``cat_file(start, end)``); each is retried on transient failures (connection reset or
refused, timeouts, HTTP 5xx and 429, short or over-long bodies) with exponential backoff and full jitter, at most
``retries`` times, and its bytes are used only once the whole range has arrived: a retried read never yields
partial bytes. A failure that stays, or one that is not transient (missing object, permission), is one ShardError
naming the url and the last cause; the stream adds the sample key. Filesystems are made per process (never
pickled), with the timeout applied to connecting and to every socket read, and the back-end's own retries turned
off so that ``retries`` is the one bound.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec

from maestro_data.errors import MaestroError, ShardError

T = TypeVar("T")
READAHEAD = 8 << 20  # one remote request serves the headers and members of a few consecutive samples


@dataclass(frozen=True)
class AccessOptions:
    """How remote bytes are read: ``retries`` after the first attempt, ``timeout_s`` per connect and socket read,
    backoff doubling from ``backoff_s`` up to ``backoff_max_s``; ``storage_options`` go to fsspec (e.g.
    ``{"endpoint_url": ...}`` for an S3-compatible store)."""

    retries: int = 5
    timeout_s: float = 60.0
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    storage_options: dict = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            out.append(f"retries {self.retries!r} is not a whole number >= 0")
        if not self.timeout_s > 0 or self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            out.append("timeout_s must be > 0 and 0 <= backoff_s <= backoff_max_s")
        if not isinstance(self.storage_options, dict):
            out.append("storage_options must be a dict")
        return out


class Missing(ShardError):
    """The object does not exist (not retried)."""


class ShortRead(OSError):
    """A body whose length is not the one asked for (truncated, or a wrong Content-Length): retried."""


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)  # ours: never a message


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: network and server-side failures yes; a missing object, a refused
    permission or a malformed request no."""
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        # fsspec's http size lookup reports any failure (a 503 too) as FileNotFoundError from the real cause
        return is_transient(exc.__cause__)
    if isinstance(exc, (*_PERMANENT, MaestroError)):
        return False
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError (fsspec's http)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(exc, OSError | TimeoutError):
        return True
    module = type(exc).__module__.split(".")[0]
    # aiohttp's payload/connection errors, botocore's connection/read-timeout errors
    return module in ("aiohttp", "botocore", "aiobotocore", "urllib3", "http")


def describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        return describe(exc.__cause__)  # fsspec's wrapper: the cause says what happened
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def with_retries(action: Callable[[], T], what: str, options: AccessOptions) -> T:
    """``action()``, retried on transient failures; then one ShardError naming ``what`` and the last cause."""
    # jitter must differ between the processes that hit one failing server, or they retry in lockstep
    rng = random.Random(f"{os.getpid()}:{what}")
    last: BaseException | None = None
    for attempt in range(options.retries + 1):
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
        if attempt < options.retries:
            time.sleep(rng.uniform(0, min(options.backoff_max_s, options.backoff_s * 2 ** attempt)))
    raise ShardError(f"{what}: still failing after {options.retries + 1} attempts (retries={options.retries}, "
                     f"timeout_s={options.timeout_s:g}); last cause: {describe(last)}")


def _backend_options(protocol: str, options: AccessOptions) -> dict:
    """Timeouts for the back-end, and its own retries off (``with_retries`` is the one bound)."""
    t = options.timeout_s
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t,
                                  "retries": {"max_attempts": 1, "mode": "standard"}}}
    return {}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def filesystem(url: str, options: AccessOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of ``url``; the user's storage options override our defaults."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    kwargs = _merge(_backend_options(protocol, options), options.storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
    except (ImportError, ValueError) as exc:
        raise ShardError(f"{url}: cannot open: {exc} (remote urls need the s3/gcs/http extras)") from exc
    if protocol in ("s3", "s3a"):
        # s3fs retries on its own (a class attribute, not an option); this instance is ours (our config_kwargs
        # are part of fsspec's instance key), so the user's own s3fs instances keep their behaviour
        fs.retries = 1
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def fetch_range(fs, path: str, url: str, start: int, end: int, options: AccessOptions) -> bytes:
    """Exactly the bytes [start, end) of a remote object, retried; never a partial body."""

    def attempt() -> bytes:
        data = fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:
            raise ShortRead(f"{len(data)} bytes for the range [{start}, {end}), expected {end - start}")
        return data

    return _named(url, lambda: with_retries(attempt, url, options))


def _named(url: str, action: Callable[[], T]) -> T:
    """``action()`` with any failure that is not already ours turned into one ShardError naming ``url``."""
    try:
        return action()
    except FileNotFoundError:
        raise Missing(f"{url}: missing") from None
    except (MaestroError, *_BUGS):
        raise
    except Exception as exc:  # the back-ends' own types (aiohttp, botocore) for a permanent failure
        raise ShardError(f"{url}: {describe(exc)}") from exc


def remote_size(url: str, options: AccessOptions, expected: int | None = None) -> int:
    """The object's size; with ``expected``, a different answer is retried like a short read (a server's
    Content-Length can be wrong once) and is an error only when it stays."""
    fs, path = filesystem(url, options)

    def attempt() -> int:
        size = fs.size(path)
        if size is None:
            raise ShardError(f"{url}: the server does not tell the object's size")
        if expected is not None and size != expected:
            raise ShortRead(f"{size} bytes, the index says {expected} (truncated or replaced?)")
        return int(size)

    return _named(url, lambda: with_retries(attempt, url, options))


def object_size(url: str, options: AccessOptions) -> int:
    if is_local(url):
        try:
            return os.stat(local_path(url)).st_size
        except FileNotFoundError:
            raise Missing(f"{url}: missing") from None
    return remote_size(url, options)


def read_object(url: str, options: AccessOptions, size: int | None = None, sha256: str | None = None,
                max_bytes: int | None = None) -> bytes:
    """A whole small object (index, sidecar), its ``size`` and ``sha256`` checked when given."""
    if is_local(url):
        try:
            with open(local_path(url), "rb") as f:
                data = f.read(max_bytes + 1 if max_bytes is not None else -1)
        except FileNotFoundError:
            raise Missing(f"{url}: missing") from None
        except OSError as exc:
            raise ShardError(f"{url}: unreadable: {describe(exc)}") from exc
    else:
        fs, path = filesystem(url, options)
        total = size if size is not None else remote_size(url, options)
        if max_bytes is not None and total > max_bytes:
            raise ShardError(f"{url}: {total} bytes, more than the {max_bytes} a file of this kind may have")
        data = fetch_range(fs, path, url, 0, total, options) if total else b""
    if max_bytes is not None and len(data) > max_bytes:
        raise ShardError(f"{url}: more than the {max_bytes} bytes a file of this kind may have")
    if size is not None and len(data) != size:
        raise ShardError(f"{url}: {len(data)} bytes, the index says {size} (truncated or replaced)")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ShardError(f"{url}: sha256 mismatch with the index (corrupted or replaced)")
    return data


def write_object(url: str, data: bytes, options: AccessOptions) -> None:
    """``data`` at ``url``: locally through a temporary name and a rename, remotely as one retried upload (an
    object store's put is atomic)."""
    if is_local(url):
        path = local_path(url)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = filesystem(url, options)
    _named(url, lambda: with_retries(lambda: fs.pipe_file(path, data), url, options))


class ByteSource:
    """Exact reads of byte ranges of one shard: ``readinto(position, view)`` fills ``view`` or raises."""

    url: str
    size: int

    def readinto(self, position: int, view: memoryview) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalSource(ByteSource):
    """A local (or cached) file, read with ``pread`` (no shared file position)."""

    def __init__(self, fd: int, url: str, size: int):
        self._fd, self.url, self.size = fd, url, size
        actual = os.fstat(fd).st_size
        if actual != size:
            self.close()
            raise ShardError(f"{url}: {actual} bytes, the index says {size} (truncated or replaced)")

    def readinto(self, position: int, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], position + got)
            if n == 0:
                raise ShardError(f"{self.url}: truncated at byte {position + got}")
            got += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_local(path: str, url: str, size: int) -> LocalSource:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise Missing(f"{url}: missing") from None
    except OSError as exc:
        raise ShardError(f"{url}: unreadable: {describe(exc)}") from exc
    return LocalSource(fd, url, size)


class RemoteSource(ByteSource):
    """A remote object read by retried range requests of at least ``READAHEAD`` bytes: sequential reads of the
    headers and members of consecutive samples cost one request per few MiB."""

    def __init__(self, url: str, size: int, options: AccessOptions):
        self.url, self.size, self.options = url, size, options
        self._fs, self._path = filesystem(url, options)
        self._chunk, self._chunk_start = b"", 0

    def readinto(self, position: int, view: memoryview) -> None:
        n = len(view)
        if position + n > self.size:
            raise ShardError(f"{self.url}: read past the end ({position + n} > {self.size} bytes)")
        offset = position - self._chunk_start
        if not (offset >= 0 and offset + n <= len(self._chunk)):
            end = min(self.size, position + max(n, READAHEAD))
            self._chunk = fetch_range(self._fs, self._path, self.url, position, end, self.options)
            self._chunk_start, offset = position, 0
        view[:] = memoryview(self._chunk)[offset:offset + n]


_CHECKED_SIZES: dict[str, int] = {}  # per process: remote shards whose size has been confirmed once


def open_source(url: str, size: int, options: AccessOptions) -> ByteSource:
    """The shard at ``url`` for range reads, after checking that it has the ``size`` the index says."""
    if is_local(url):
        return open_local(local_path(url), url, size)
    if _CHECKED_SIZES.get(url) != size:
        _CHECKED_SIZES[url] = remote_size(url, options, expected=size)
    return RemoteSource(url, size, options)


class SourceFile(io.RawIOBase):
    """A read-only, seekable file over a ByteSource, for readers that want a file (``tarfile``)."""

    def __init__(self, source: ByteSource):
        super().__init__()
        self.source, self._pos = source, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.source.size - self._pos))
        if n:
            self.source.readinto(self._pos, memoryview(buffer).cast("B")[:n])
            self._pos += n
        return n
