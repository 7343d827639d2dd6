"""A node-local cache of remote shards and sidecars: fetched once, verified, shared by every process of the node.

Entries are content-addressed (``<dir>/<sha256[:2]>/<sha256>.tar``, by the index's sha256), so a shard rewritten
under a new index never meets its former copy. One process fills an entry while the others wait on its file lock:
the bytes go to a temporary name in retried ranges, are checked against the index's size and sha256, and are
renamed into place, so a reader sees a whole verified file or none. After each fill the least recently used
entries (the modification time, touched at every use) are removed until the cache fits ``limit_bytes``; a process
that still reads a removed entry keeps its open file, and one that meets a vanished entry fetches it again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from filelock import FileLock

from maestro_data.errors import ShardError
from maestro_data.stream.remote import (
    AccessOptions,
    ByteSource,
    LocalSource,
    fetch_range,
    filesystem,
    is_local,
    open_source,
    read_object,
    remote_size,
)

CHUNK = 16 << 20  # bytes per retried range request while filling an entry
ENTRY_SUFFIXES = (".tar", ".json")


class ShardCache:
    """Local copies of remote objects, keyed by their sha256 (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, limit_bytes: int | None, options: AccessOptions):
        self.root, self.limit_bytes, self.options = Path(root), limit_bytes, options
        self.root.mkdir(parents=True, exist_ok=True)

    def entry(self, sha256: str, suffix: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}{suffix}"

    def open_source(self, url: str, size: int, sha256: str, suffix: str = ".tar") -> LocalSource:
        """The object from the cache (filled first when absent), for range reads."""
        for _ in range(3):
            path = self.fill(url, size, sha256, suffix)
            try:
                return LocalSource(os.open(path, os.O_RDONLY), url, size)
            except FileNotFoundError:  # evicted by another process between fill and open
                continue
        raise ShardError(f"{url}: its cache entry vanished three times; is cache_limit_gb smaller than what the "
                         "workers of this node read at once?")

    def read_bytes(self, url: str, size: int, sha256: str) -> bytes:
        """A small object (a sidecar) from the cache."""
        data = bytearray(size)
        with self.open_source(url, size, sha256, ".json") as source:
            source.readinto(0, memoryview(data))
        return bytes(data)

    def fill(self, url: str, size: int, sha256: str, suffix: str) -> Path:
        """The entry's path, fetched and verified by exactly one process of the node when absent."""
        path = self.entry(sha256, suffix)
        if self._touch(path, size):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            if self._touch(path, size):  # another process filled it while this one waited
                return path
            for stale in path.parent.glob(f"{path.name}.tmp*"):  # left by a process that died while filling
                stale.unlink(missing_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            try:
                self._download(url, tmp, size, sha256)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        self.evict(keep=path)
        return path

    @staticmethod
    def _touch(path: Path, size: int) -> bool:
        """Whether a complete entry is there; marks it as just used (the LRU order is the modification time)."""
        try:
            if path.stat().st_size != size:
                return False
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def _download(self, url: str, tmp: Path, size: int, sha256: str) -> None:
        remote_size(url, self.options, expected=size)
        fs, path = filesystem(url, self.options)
        digest = hashlib.sha256()
        with open(tmp, "wb") as f:
            for start in range(0, size, CHUNK):
                data = fetch_range(fs, path, url, start, min(size, start + CHUNK), self.options)
                digest.update(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != sha256:
            raise ShardError(f"{url}: sha256 mismatch with the index (corrupted or replaced); not cached")

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used entries until the cache fits its limit (``keep`` stays)."""
        if self.limit_bytes is None:
            return
        with FileLock(str(self.root / ".evict.lock")):
            entries = []
            for p in self.root.glob("*/*"):
                if p.suffix in ENTRY_SUFFIXES:
                    try:
                        st = p.stat()
                    except FileNotFoundError:
                        continue
                    entries.append((st.st_mtime_ns, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries):
                if total <= self.limit_bytes:
                    break
                if p != keep:
                    p.unlink(missing_ok=True)
                    total -= size


class Access:
    """What a reader needs to fetch shards and sidecars: remote reads with retries, through the cache when one is
    configured (local files are read in place). Picklable: it holds settings only."""

    def __init__(self, options: AccessOptions | None = None, cache_dir: str | os.PathLike | None = None,
                 cache_limit_gb: float | None = None):
        self.options = options or AccessOptions()
        limit = None if cache_limit_gb is None else int(cache_limit_gb * 1e9)
        self.cache = ShardCache(cache_dir, limit, self.options) if cache_dir else None

    def read_object(self, url: str, size: int, sha256: str) -> bytes:
        if self.cache is not None and not is_local(url):
            return self.cache.read_bytes(url, size, sha256)
        return read_object(url, self.options, size, sha256)

    def open_shard(self, url: str, size: int, sha256: str) -> ByteSource:
        if self.cache is not None and not is_local(url):
            return self.cache.open_source(url, size, sha256)
        return open_source(url, size, self.options)
