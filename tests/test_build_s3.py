"""`build --out s3://...` against moto's S3 server (server mode, through s3fs), credentials from the environment
only: the bucket holds the store and shards of a local build (shards byte for byte), `verify s3://...` checks them
(and names a lost chunk object), the loader streams them, and a build killed while uploading (the store, or the
shards) resumes to the same bytes from what the bucket holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner
from faultserver import moto_s3
from streamkit import TREESAT, run, same_batches
from test_build_cluster import files, same_arrays, store_arrays

import maestro_data.build.shards as shards_mod
from maestro_cli.data import main
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.location import Location
from maestro_data.synthetic import generate

SECRET = "never-written-s3cr3t"  # must appear in no object the build writes
BUCKET = "maestro-build"
TILES = 4
ARGS = ["--block-tiles", "1", "--shard-size", "1KiB", "--quiet"]  # a block and a shard per tile: many uploads


@pytest.fixture(scope="module")
def s3():
    server = moto_s3(own_process=True)
    yield server
    server.stop()


def _env(s3) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL_S3": s3.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1"}


def _bucket() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances made under another environment keep their settings
    fs = s3fs.S3FileSystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)


@pytest.fixture
def env(s3, monkeypatch) -> dict[str, str]:
    """Credentials and endpoint as a user sets them: environment variables read by botocore, no option of ours."""
    import s3fs

    values = _env(s3)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    _bucket()
    yield values
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(raw folder, the same build written to a local folder): the reference."""
    root = tmp_path_factory.mktemp("s3ref")
    raw = generate("treesatai-ts", root / "raw", tiles=TILES, seed=4)
    result = CliRunner().invoke(main, ["build", "treesatai-ts", "--src", str(raw), "--out", str(root / "out"), *ARGS])
    assert result.exit_code == 0, result.output
    return raw, root / "out"


@pytest.fixture(scope="module")
def built(s3, local) -> tuple[str, float]:
    """The local reference's build, written to the bucket by the CLI: (url, seconds)."""
    raw, _ = local
    url = f"s3://{BUCKET}/flat/run"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env(s3).items():
            mp.setenv(k, v)
        _bucket()
        t0 = time.perf_counter()
        result = CliRunner().invoke(main, ["build", "treesatai-ts", "--src", str(raw), "--out", url, *ARGS])
        seconds = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    return url, seconds


def test_build_to_s3_verify_and_stream(env, local, built):
    raw, reference = local
    url, seconds = built
    print(f"s3 (moto) build of {TILES} tiles: {seconds:.2f} s")
    out = Location.of(url)
    assert same_arrays(store_arrays(out), store_arrays(reference))
    assert files(out.child("shards")) == files(Location.of(reference / "shards"))
    assert not any(SECRET.encode() in data for data in files(out).values())
    ok = CliRunner().invoke(main, ["verify", url, "--full"])
    assert ok.exit_code == 0 and f"every chunk of {url}" in ok.output and f"every shard of {url}/shards" in ok.output
    assert same_batches(run(f"{url}/shards", batch_size=2, seed=1, manifest=TREESAT),
                        run(reference / "shards", batch_size=2, seed=1, manifest=TREESAT))
    lost = f"{url}/store.zarr/s2/data/c/1/0/0/0"  # block 1: tile 1
    Location.of(lost.rsplit("/", 1)[0]).delete("0")
    bad = CliRunner().invoke(main, ["verify", url])
    assert bad.exit_code == 1 and f"BAD {lost}: missing (written by the build" in bad.output
    again = CliRunner().invoke(main, ["build", "treesatai-ts", "--src", str(raw), "--out", url, "--resume",
                                      "--no-shards", *ARGS])
    assert again.exit_code == 0, again.output
    assert CliRunner().invoke(main, ["verify", url]).exit_code == 0
    assert same_arrays(store_arrays(out), store_arrays(reference))


def test_a_build_killed_while_uploading_the_store_resumes_to_the_same_bytes(env, local):
    raw, reference = local
    url = f"s3://{BUCKET}/cut"
    out = Location.of(url)
    args = ["build", "treesatai-ts", "--src", str(raw), "--out", url, *ARGS, "--no-shards"]  # shards: the next test
    cmd = [sys.executable, "-m", "maestro_cli.data", *args]
    victim = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None and len(out.list("_build/blocks", ".json")) < 2:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    done = len(out.list("_build/blocks", ".json"))
    assert victim.returncode == -signal.SIGKILL and 0 < done < TILES and not out.exists("report.json"), \
        f"not killed mid-way: {victim.stderr.read().decode()[-2000:]}"
    resumed = CliRunner().invoke(main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert same_arrays(store_arrays(out), store_arrays(reference))
    assert json.loads(out.read_bytes("report.json"))["tiles_written"] == TILES


def test_shards_killed_while_uploading_resume_from_what_the_bucket_holds(env, local, built, monkeypatch):
    _, reference = local
    url, _ = built
    target = f"s3://{BUCKET}/reshard"
    real, calls = shards_mod._write_shard, []

    def dying(job, task):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while uploading")
        calls.append(task.url)
        return real(job, task)

    monkeypatch.setattr(shards_mod, "_write_shard", dying)
    options = ShardOptions(shard_bytes=1024, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        write_shards(url, target, options)
    out = Location.of(target)
    assert out.size("index.json") is None and len(out.list("_build/train", ".json")) + \
        len(out.list("_build/val", ".json")) + len(out.list("_build/test", ".json")) == 2
    monkeypatch.setattr(shards_mod, "_write_shard", lambda job, task: calls.append(task.url) or real(job, task))
    write_shards(url, target, replace(options, resume=True))
    assert len(calls) == TILES == len(set(calls))  # the two finished shards were kept, not written again
    assert files(out) == files(Location.of(reference / "shards"))


def test_file_urls_and_paths_are_local_folders(tmp_path):
    for where in (f"file://{tmp_path}", str(tmp_path), tmp_path):
        loc = Location.of(where)
        assert loc.is_local and loc.join("a/b") == str(tmp_path / "a" / "b")
    assert Location.of("s3://bucket/prefix/").join("a") == "s3://bucket/prefix/a"
