"""Where a build's tasks run: a local process pool or a Dask cluster, both running the same task functions.

A stage is one function ``fn(context, item)`` over many items (batches of tiles to probe, blocks to convert,
shards to write). The context (source, plan, output location: large, the same for every task) reaches each
worker once; each task carries only its item (a block number and its tile refs); results come back as tasks
finish, which drives the progress bar. The local pool is made of spawned processes (zarr runs an event-loop
thread, which forking would copy in an unusable state), started once for all the stages of an executor (spawning
and importing costs seconds per process); each stage's context goes to them as one pickle file that every process
loads once; with one worker, this process alone runs the tasks. On Dask the context is scattered to every worker
and one task is submitted per item; a worker that dies has its tasks rescheduled by Dask, and because a task
writes whole objects and its marker last, a task that runs twice writes the same bytes. Heavy per-process handles
(an open zarr group) are kept by ``worker_cache`` for the tasks of one context.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from maestro_data.errors import ExecutorError

R = TypeVar("R")
Task = Callable[[Any, Any], R]
OnDone = Callable[[int, Any], None]
DASK_EXTRA = "pip install maestro-eo[dask]"

# --- worker side -----------------------------------------------------------------------------------------------------
_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()  # a Dask worker may run several tasks at once in threads
_CONTEXTS: dict[str, Any] = {}  # the local pool's current context, loaded once per worker process


def new_token() -> str:
    """A fresh name for one stage's context (the key of ``worker_cache``)."""
    return uuid.uuid4().hex


def worker_cache(token: str, factory: Callable[[], R]) -> R:
    """The handle ``factory()`` made once per process for the context named ``token``; handles of earlier
    contexts are dropped (a long-lived Dask worker keeps one stage's handles, not every build's)."""
    with _CACHE_LOCK:
        if token not in _CACHE:
            _CACHE.clear()
            _CACHE[token] = factory()
        return _CACHE[token]


def release_worker_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _apply_local(fn: Task, token: str, path: str, item: Any) -> Any:
    with _CACHE_LOCK:
        if token not in _CONTEXTS:
            _CONTEXTS.clear()
            with open(path, "rb") as f:
                _CONTEXTS[token] = pickle.load(f)  # our own file, written by this run's parent process
        context = _CONTEXTS[token]
    return fn(context, item)


def _apply(item: Any, fn: Task, context: Any) -> Any:
    return fn(context, item)


# --- executors -------------------------------------------------------------------------------------------------------
class Executor:
    """Runs ``fn(context, item)`` for every item; ``run`` returns the results in item order and calls
    ``on_done(position, result)`` as each task finishes. A task's exception is raised as is."""

    workers: int = 1

    def run(self, fn: Task, context: Any, items: Sequence[Any], label: str = "task",
            on_done: OnDone | None = None) -> list[Any]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """A pool of ``workers`` spawned processes (started at the first stage that needs them, kept until ``close``),
    or this process alone when ``workers`` is 1."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def describe(self) -> str:
        return f"{self.workers} local process(es)"

    def run(self, fn: Task, context: Any, items: Sequence[Any], label: str = "task",
            on_done: OnDone | None = None) -> list[Any]:
        results: list[Any] = [None] * len(items)
        if self.workers == 1 or len(items) <= 1:
            try:
                for i, item in enumerate(items):
                    results[i] = fn(context, item)
                    if on_done:
                        on_done(i, results[i])
            finally:
                release_worker_cache()  # this process ran the worker side: drop its open store and source
            return results
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            self._dir = tempfile.TemporaryDirectory(prefix="maestro-executor-")
        token = new_token()
        path = os.path.join(self._dir.name, f"{token}.pickle")
        with open(path, "wb") as f:
            pickle.dump(context, f, protocol=pickle.HIGHEST_PROTOCOL)
        futures = {self._pool.submit(_apply_local, fn, token, path, item): i for i, item in enumerate(items)}
        try:
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_done:
                    on_done(i, results[i])
        except BaseException:
            for fut in futures:
                fut.cancel()
            self.close()  # a failed stage ends the build: do not leave its running tasks behind
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):  # close() may have removed the folder already
                os.unlink(path)
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class DaskExecutor(Executor):
    """Tasks on a Dask cluster: the scheduler at ``scheduler`` (an address such as ``tcp://host:8786``, or a
    scheduler file written by ``dask scheduler --scheduler-file`` or dask-jobqueue), else a LocalCluster of
    ``workers`` single-threaded processes started here and closed with this executor."""

    def __init__(self, scheduler: str | None = None, workers: int = 2, connect_timeout_s: float = 60.0):
        try:
            import distributed
        except ImportError:
            raise ExecutorError(f"--executor dask needs Dask's distributed scheduler: {DASK_EXTRA}") from None
        self._cluster = None
        self.scheduler = scheduler
        try:
            if scheduler is None:
                self._cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                         dashboard_address=None, silence_logs=logging.ERROR)
                self.client = distributed.Client(self._cluster)
            elif scheduler.endswith(".json") or Path(scheduler).is_file():
                self.client = distributed.Client(scheduler_file=scheduler, timeout=connect_timeout_s)
            else:
                self.client = distributed.Client(scheduler, timeout=connect_timeout_s)
        except (OSError, TimeoutError, ValueError) as exc:
            self.close()
            raise ExecutorError(f"{scheduler or 'LocalCluster'}: cannot start or reach the Dask scheduler "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})))

    def describe(self) -> str:
        where = self.scheduler or "a LocalCluster"
        return f"Dask at {where} ({self.workers} worker(s) now)"

    def run(self, fn: Task, context: Any, items: Sequence[Any], label: str = "task",
            on_done: OnDone | None = None) -> list[Any]:
        import distributed

        results: list[Any] = [None] * len(items)
        if not items:
            return results
        # every worker gets its own copy of the context: a worker that dies does not take the only one with it
        shared = self.client.scatter(context, broadcast=True, hash=False)
        run_id = uuid.uuid4().hex[:8]
        keys = [f"maestro-{label}-{run_id}-{i}" for i in range(len(items))]
        futures = self.client.map(_apply, list(items), key=keys, fn=fn, context=shared, pure=False)
        position = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in distributed.as_completed(futures):
                i = position[fut.key]
                try:
                    results[i] = fut.result()
                except (distributed.KilledWorker, distributed.CancelledError) as exc:
                    raise ExecutorError(f"{keys[i]}: {type(exc).__name__} ({str(exc).splitlines()[0][:200]}): the "
                                        "Dask cluster lost this task; rerun with --resume to keep what is done") \
                        from None
                fut.release()
                if on_done:
                    on_done(i, results[i])
        finally:
            self.client.cancel([*futures, shared])
        return results

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_executor(kind: str = "local", workers: int = 1, scheduler: str | None = None) -> Executor:
    """``local`` (a pool of ``workers`` processes) or ``dask`` (the cluster at ``scheduler``, else a LocalCluster
    of ``workers`` processes)."""
    if kind == "local":
        if scheduler is not None:
            raise ExecutorError("--scheduler is for --executor dask")
        return LocalExecutor(workers)
    if kind == "dask":
        return DaskExecutor(scheduler, workers=max(1, workers))
    raise ExecutorError(f"unknown executor {kind!r}: expected 'local' or 'dask'")
