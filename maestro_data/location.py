"""Where a build writes: a local folder or any fsspec url (``s3://bucket/prefix``, ``gs://...``, ``file://...``).

One small interface for the build's outputs (tile store, block markers, shards, sidecars, index): exists, read,
atomic write, list, delete, sizes, sha256, upload of a finished local file, and a zarr store object. Local paths
keep their local guarantees (a temporary name and a rename, fsync where asked); on an object store a put is atomic
(an object is whole or absent) and a large file goes up as a multipart upload that appears only once complete, so
in both cases a reader never sees half an object.

Credentials are never options of this toolkit: fsspec finds them where it always does (``AWS_*`` variables, its
config files, instance metadata). ``storage_options`` (for library callers: an endpoint, a profile) travel with a
Location to the workers and are never written into anything a build produces. Filesystems are made in each
process from (url, options), never pickled: fsspec caches one instance per process and options.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from maestro_data.errors import StoreError

READ = 8 << 20


@dataclass(frozen=True)
class Location:
    """A folder, local (``url`` is a path) or remote (``url`` is an fsspec url without a trailing ``/``)."""

    url: str
    storage_options: dict = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, where: str | os.PathLike | Location, storage_options: dict | None = None) -> Location:
        if isinstance(where, Location):
            return where
        url = str(where)
        if url.startswith("file://"):
            url = url.removeprefix("file://")
        elif "://" in url:
            url = url.rstrip("/")
        return cls(url, dict(storage_options or {}))

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def path(self) -> Path:
        """The local folder (local locations only)."""
        return Path(self.url)

    def child(self, rel: str) -> Location:
        return Location(self.join(rel), self.storage_options)

    def join(self, rel: str = "") -> str:
        """The path or url of ``rel`` below this folder (a local one as ``Path`` writes it, for messages)."""
        if not rel:
            return self.url
        return str(self.path / rel) if self.is_local else f"{self.url}/{rel}"

    def __str__(self) -> str:
        return self.url

    # --- remote plumbing ------------------------------------------------------------------------------------------
    def _fs(self):
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as exc:
            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(self.url.split("://")[0], "s3")
            raise StoreError(f"{self.url}: cannot open ({exc}); install the extra: pip install maestro-eo[{extra}]") \
                from None
        return fs, root.rstrip("/")

    def _remote(self, rel: str) -> tuple[object, str]:
        fs, root = self._fs()
        return fs, f"{root}/{rel}" if rel else root

    # --- operations -----------------------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` is a file or a non-empty folder (an object store has no empty folders)."""
        if self.is_local:
            return (self.path / rel).exists()
        fs, p = self._remote(rel)
        fs.invalidate_cache()  # another process (a worker, a killed build) may have written since the last listing
        return bool(fs.exists(p))

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            return (self.path / rel).read_bytes()
        fs, p = self._remote(rel)
        return fs.cat_file(p)

    def read_many(self, rels: list[str]) -> dict[str, bytes | None]:
        """Several small files at once (remote: concurrent requests); None for a missing one."""
        if self.is_local:
            out: dict[str, bytes | None] = {}
            for rel in rels:
                try:
                    out[rel] = (self.path / rel).read_bytes()
                except FileNotFoundError:
                    out[rel] = None
            return out
        if not rels:
            return {}
        fs, root = self._fs()
        got = fs.cat([f"{root}/{r}" for r in rels], on_error="return")
        return {r: (v if isinstance(v, bytes) else None) for r, v in zip(rels, (got[f"{root}/{r}"] for r in rels),
                                                                          strict=True)}

    def write_bytes(self, rel: str, data: bytes, durable: bool = False) -> None:
        """``data`` at ``rel``, whole or not at all: locally a temporary name (per process) and a rename, fsynced
        when ``durable``; remotely one put."""
        if self.is_local:
            path = self.path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        fs, p = self._remote(rel)
        fs.pipe_file(p, data)

    def write_many(self, objects: dict[str, bytes]) -> None:
        """Several files, each whole or absent (remote: concurrent puts)."""
        if self.is_local or not objects:
            for rel, data in objects.items():
                self.write_bytes(rel, data)
            return
        fs, root = self._fs()
        fs.pipe({f"{root}/{rel}": data for rel, data in objects.items()})

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        """Move a finished local file to ``rel``: a rename locally, an upload remotely (multipart for a large file:
        the object appears when the last part is in, so a killed upload leaves no object)."""
        if self.is_local:
            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, self.path / rel)
            return
        fs, p = self._remote(rel)
        fs.put_file(str(local), p)

    def delete(self, rel: str) -> None:
        if self.is_local:
            (self.path / rel).unlink(missing_ok=True)
            return
        fs, p = self._remote(rel)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(p)

    def remove_tree(self, rel: str) -> None:
        if self.is_local:
            shutil.rmtree(self.path / rel, ignore_errors=True)
            return
        fs, p = self._remote(rel)
        fs.invalidate_cache()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(p, recursive=True)

    def list(self, rel: str, suffix: str = "") -> list[str]:
        """Names of the files directly in folder ``rel`` that end with ``suffix``, sorted."""
        if self.is_local:
            folder = self.path / rel
            return sorted(p.name for p in folder.glob(f"*{suffix}") if p.is_file()) if folder.is_dir() else []
        fs, p = self._remote(rel)
        fs.invalidate_cache()
        try:
            entries = fs.ls(p, detail=True)
        except FileNotFoundError:
            return []
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")
        return sorted(n for n in names if n.endswith(suffix))

    def size(self, rel: str) -> int | None:
        """Bytes of the file ``rel``; None when it does not exist."""
        if self.is_local:
            try:
                return (self.path / rel).stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                return None
        fs, p = self._remote(rel)
        try:
            return int(fs.info(p)["size"])
        except FileNotFoundError:
            return None

    def sizes_of(self, rels: list[str]) -> dict[str, int]:
        """Sizes of the files ``rels`` that exist (remote: concurrent requests)."""
        if self.is_local or not rels:
            return {r: s for r in rels if (s := self.size(r)) is not None}
        from fsspec.asyn import AsyncFileSystem, sync

        fs, root = self._fs()
        if not isinstance(fs, AsyncFileSystem):
            return {r: s for r in rels if (s := self.size(r)) is not None}

        async def all_info():
            return await asyncio.gather(*(fs._info(f"{root}/{r}") for r in rels), return_exceptions=True)

        infos = sync(fs.loop, all_info)
        out = {}
        for rel, info in zip(rels, infos, strict=True):
            if isinstance(info, FileNotFoundError):
                continue
            if isinstance(info, BaseException):
                raise info
            out[rel] = int(info["size"])
        return out

    def sizes(self, rel: str = "") -> dict[str, int]:
        """Every file below folder ``rel`` with its size, keyed by its path relative to ``rel`` (remote: one paged
        listing instead of a request per file)."""
        if self.is_local:
            base = self.path / rel
            out = {}
            for dirpath, _, files in os.walk(base):
                for name in files:
                    with contextlib.suppress(OSError):  # removed while we walk: simply not there
                        full = os.path.join(dirpath, name)
                        out[Path(os.path.relpath(full, base)).as_posix()] = os.stat(full).st_size
            return out
        fs, p = self._remote(rel)
        fs.invalidate_cache()
        try:
            found = fs.find(p, detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(p) + 1:]: int(v["size"]) for k, v in found.items() if v.get("type", "file") == "file"}

    def tree_bytes(self, rel: str = "") -> int:
        return sum(self.sizes(rel).values())

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        if self.is_local:
            f = open(self.path / rel, "rb")  # noqa: SIM115 - closed below
        else:
            fs, p = self._remote(rel)
            f = fs.open(p, "rb", block_size=READ)
        with f:
            while chunk := f.read(READ):
                h.update(chunk)
        return h.hexdigest()

    def makedirs(self) -> None:
        """The local folder (an object store needs none)."""
        if self.is_local:
            self.path.mkdir(parents=True, exist_ok=True)

    def zarr_store(self, read_only: bool = False):
        """The zarr store of this folder: zarr's LocalStore, or its FsspecStore over the url with these options."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(str(self.path), read_only=read_only)
        try:
            return FsspecStore.from_url(self.url, storage_options=dict(self.storage_options), read_only=read_only)
        except ImportError as exc:
            raise StoreError(f"{self.url}: cannot open ({exc}); install the extra: pip install maestro-eo[s3]") \
                from None


STORE_NAME = "store.zarr"


def resolve_store(path: str | os.PathLike | Location) -> Location:
    """The tile store of a build output or the store itself: ``<out>/store.zarr`` when there is one, else ``path``."""
    loc = Location.of(path)
    if loc.is_local:
        return loc.child(STORE_NAME) if (loc.path / STORE_NAME).is_dir() else loc
    return loc.child(STORE_NAME) if loc.size(f"{STORE_NAME}/zarr.json") is not None else loc
