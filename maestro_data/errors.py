"""One exception type per pipeline stage, so the CLI can print a single clear line and exit non-zero."""


class MaestroError(Exception):
    """Base class: the message names the file or tile and what was expected."""


def describe_os_error(exc: OSError, where: object = None) -> str:
    """One line naming the path (the failed file, else ``where``) and the cause of a failed file operation."""
    import errno

    path = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p) or (str(where) if where else "a file")
    cause = exc.strerror or str(exc) or type(exc).__name__
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "; free space (or raise the limit) and rerun (a build: with --resume, keeping the converted blocks)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; check the permissions of that path"
    return f"{path}: {cause}{hint}"


class ManifestError(MaestroError):
    """A dataset manifest is malformed or inconsistent (the message names the key)."""


class SourceError(MaestroError):
    """A raw dataset file is missing, corrupt or does not match the manifest."""

    def __init__(self, message: str, *, tile_id: str | None = None, path: str | None = None):
        parts = []
        if tile_id is not None:
            parts.append(f"tile {tile_id!r}")
        if path is not None:
            parts.append(f"{path}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.tile_id = tile_id
        self.path = path
        self.reason = message


class StoreError(MaestroError):
    """The zarr tile store is missing, incomplete or was built from another manifest."""


class ExecutorError(MaestroError):
    """The engine that runs a build's tasks (a Dask cluster) is missing, unreachable or lost."""


class ShardError(MaestroError):
    """A WebDataset shard or its index is missing, corrupt or inconsistent."""


class StreamError(MaestroError):
    """The streaming loader met a sample it cannot turn into a batch."""
