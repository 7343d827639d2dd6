"""Remote shard sets against real servers started here: a local HTTP server that injects faults (503, resets
mid-body, truncated bodies, wrong Content-Length, slow responses) and moto's S3 server reached through s3fs.
Under faults an epoch equals the local one byte for byte; a shard that stays broken is one named error after the
configured retries; the node-local cache is filled once, verified, shared by processes, and makes the next epoch
read no remote byte."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

import pytest
from faultserver import KINDS, Faults, FaultServer, moto_s3
from streamkit import TREESAT, run, same_batches

from maestro_data.errors import ShardError, StreamError
from maestro_data.stream.cache import Access, ShardCache
from maestro_data.stream.loader import StreamConfig, make_loader
from maestro_data.stream.remote import AccessOptions, ShortRead, is_transient, with_retries
from maestro_data.stream.verify import verify

FAST = dict(timeout_s=0.5, backoff_s=0.01)  # slow responses outlast the timeout; retries wait little


@pytest.fixture
def served(mem):
    """The ``mem`` shard set behind a fault-injecting HTTP server (faults off until a test sets them)."""
    with FaultServer(mem.parent) as server:
        server.index = f"{server.url}/{mem.name}"
        yield server


def test_transient_failures_are_retried_and_permanent_ones_are_not():
    import aiohttp

    assert all(is_transient(e) for e in (ConnectionResetError(), TimeoutError(), ShortRead("short"),
                                         aiohttp.ClientPayloadError("cut"), _status(503), _status(429)))
    assert not any(is_transient(e) for e in (PermissionError(), ValueError(), ShardError("x"), _status(403)))
    missing = FileNotFoundError("u")  # fsspec's http size lookup wraps every failure so
    missing.__cause__ = _status(503)
    assert is_transient(missing) and not is_transient(FileNotFoundError("u"))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return b"ok"

    assert with_retries(flaky, "u", AccessOptions(retries=2, backoff_s=0.001)) == b"ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(ShardError, match=r"u: still failing after 2 attempts .*last cause: ConnectionResetError"):
        with_retries(flaky, "u", AccessOptions(retries=1, backoff_s=0.001))


def _status(code: int):
    import aiohttp

    return aiohttp.ClientResponseError(None, (), status=code, message="injected")


def test_an_epoch_under_injected_faults_equals_the_local_epoch(mem, served):
    served.faults = Faults(every=3)
    kw = dict(batch_size=4, seed=5, block_samples=8, retries=8, **FAST)
    remote = run(served.index, **kw)
    assert same_batches(remote, run(mem, **kw))
    assert set(served.faults.injected) == set(KINDS)  # every kind of fault was met and survived
    served.faults = Faults(every=4)
    assert verify(served.index, full=True, options=AccessOptions(retries=8, **FAST)) == []


@pytest.mark.parametrize("kind", ["503", "truncate"])
def test_a_shard_that_stays_broken_is_named_after_the_configured_retries(mem, served, kind):
    shard = sorted(p.relative_to(mem.parent).as_posix() for p in (mem / "val").glob("*.tar"))[0]
    served.faults = Faults(broken={shard}, broken_kind=kind)
    with pytest.raises(StreamError) as info:
        run(served.index, "val", mode="eval", retries=2, **FAST)
    message = str(info.value)
    assert f"{served.url}/{shard}" in message and "after 3 attempts" in message and "sample '" in message
    assert ("503" in message) if kind == "503" else ("ShortRead" in message or "Payload" in message)
    assert served.requests[shard] >= 3


def test_the_cache_is_filled_once_and_the_next_epoch_reads_no_remote_byte(mem, served, tmp_path):
    kw = dict(batch_size=4, seed=1, num_workers=2, **FAST)
    cached = make_loader(StreamConfig(served.index, "train", cache_dir=str(tmp_path / "cache"), **kw), TREESAT)
    local = make_loader(StreamConfig(str(mem), "train", **kw), TREESAT)
    assert same_batches(list(cached), list(local))
    filled = sum(served.bytes_sent.values())
    for loader in (cached, local):
        loader.set_epoch(1)
    assert same_batches(list(cached), list(local))  # new worker processes, every byte from the cache
    assert sum(served.bytes_sent.values()) == filled
    tars = list((tmp_path / "cache").rglob("*.tar"))
    assert len(tars) == len(list(mem.rglob("train/*.tar")))
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in tars)  # content-addressed, verified
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
    shard_requests = sum(n for rel, n in served.requests.items() if rel.endswith(".tar"))
    assert shard_requests <= 2 * len(tars)  # one size check and one download each: nobody fetched twice


def _fill(cache_dir: str, url: str, size: int, sha256: str, barrier) -> str:
    barrier.wait()
    return str(Access(AccessOptions(), cache_dir).cache.fill(url, size, sha256, ".tar"))


def test_concurrent_workers_filling_one_entry_leave_one_correct_file(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "big.tar").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    context = multiprocessing.get_context("fork")
    with FaultServer(tmp_path / "srv", Faults(slow_s=0.3)) as server, context.Pool(4) as pool:
        barrier = context.Manager().Barrier(4)
        args = (str(tmp_path / "cache"), f"{server.url}/big.tar", len(data), sha, barrier)
        paths = pool.starmap(_fill, [args] * 4)
        assert len(set(paths)) == 1
        assert server.bytes_sent["big.tar"] == len(data)  # downloaded once for four processes
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert [p.name for p in files] == [f"{sha}.tar"] and files[0].read_bytes() == data


def test_a_cached_object_with_the_wrong_bytes_is_refused_and_not_kept(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "a.tar").write_bytes(b"x" * 5000)
    cache = ShardCache(tmp_path / "cache", None, AccessOptions(backoff_s=0.001))
    with FaultServer(tmp_path / "srv") as server:
        with pytest.raises(ShardError, match="a.tar: sha256 mismatch with the index .*not cached"):
            cache.fill(f"{server.url}/a.tar", 5000, "0" * 64, ".tar")
        with pytest.raises(ShardError, match="a.tar: still failing .*5000 bytes, the index says 4000"):
            cache.fill(f"{server.url}/a.tar", 4000, "0" * 64, ".tar")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_the_cache_evicts_least_recently_used_entries_beyond_its_limit(tmp_path):
    cache = ShardCache(tmp_path, 250, AccessOptions())
    for i, name in enumerate("abcd"):
        path = cache.entry(name * 64, ".tar")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
        os.utime(path, ns=(i * 10**9, i * 10**9))
    os.utime(cache.entry("a" * 64, ".tar"))  # a was just used: it is the most recent
    cache.evict(keep=cache.entry("b" * 64, ".tar"))
    left = sorted(p.name[0] for p in tmp_path.rglob("*.tar"))
    assert left == ["a", "b"]


@pytest.fixture(scope="module")
def s3():
    server = moto_s3()
    yield server
    server.stop()


def test_s3_through_moto_reads_verifies_and_caches_like_local(mem, s3, tmp_path):
    url = s3.upload(mem, "maestro", "flat/shards")
    kw = dict(batch_size=4, seed=2, storage_options=s3.storage_options, **FAST)
    assert same_batches(run(url, **kw), run(mem, batch_size=4, seed=2))
    assert same_batches(run(url, "val", mode="eval", cache_dir=str(tmp_path / "c"), **kw),
                        run(mem, "val", mode="eval", batch_size=4, seed=2))
    assert list((tmp_path / "c").rglob("*.tar"))
    assert verify(url, full=True, options=AccessOptions(storage_options=s3.storage_options)) == []
    with pytest.raises(StreamError, match="no shard index"):
        run("s3://maestro/nothing/here", **kw)
