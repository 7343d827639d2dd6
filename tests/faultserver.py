"""Real servers for the remote-read tests and benchmarks, started in-process on 127.0.0.1.

``FaultServer`` serves a folder over HTTP/1.1 with byte ranges (as object stores do) and injects faults on a
deterministic schedule: every ``every``-th request of a shard or sidecar gets the next kind of ``kinds`` (503,
a connection reset mid-body, a body cut short, a Content-Length smaller than the body, a response slower than the
client's timeout); urls in ``broken`` fail on every request. It counts requests and body bytes per path, so a test
can tell that a cached epoch read nothing remote. ``moto_s3`` starts moto's S3 server (server mode, the real HTTP
protocol that s3fs speaks) and returns its endpoint.
"""

from __future__ import annotations

import http.server
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

KINDS = ("503", "reset", "truncate", "short_length", "slow")


@dataclass
class Faults:
    """Which requests fail and how (a schedule, so a run is reproducible)."""

    every: int = 0  # 0: no scheduled faults
    kinds: tuple[str, ...] = KINDS
    slow_s: float = 1.0
    broken: set[str] = field(default_factory=set)  # paths (relative to the root) that always fail ...
    broken_kind: str = "503"  # ... this way
    suffixes: tuple[str, ...] = ("",)  # which paths the schedule applies to (default: all)
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    injected: Counter = field(default_factory=Counter)

    def pick(self, rel: str) -> str | None:
        if rel in self.broken:
            kind = self.broken_kind
        else:
            if not self.every or not rel.endswith(self.suffixes):
                return None
            with self._lock:
                self._count += 1
                n = self._count
            if n % self.every:
                return None
            kind = self.kinds[(n // self.every) % len(self.kinds)]
        with self._lock:
            self.injected[kind] += 1
        return kind


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real clients use it

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, head: bool) -> None:
        owner: FaultServer = self.server.owner
        rel = unquote(urlparse(self.path).path).lstrip("/")
        owner.count(rel, 0)
        path = (owner.root / rel).resolve()
        if owner.root not in path.parents or not path.is_file():
            return self._empty(404)
        fault = owner.faults.pick(rel)
        if fault == "slow":
            time.sleep(owner.faults.slow_s)
        if fault == "503":
            return self._empty(503)
        total = path.stat().st_size
        start, end = 0, total
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start, end = int(match[1]), min(total, int(match[2]) + 1 if match[2] else total)
            if start >= end:
                return self._empty(416)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        self.send_response(206 if match else 200)
        length = len(body) - 1000 if fault == "short_length" and len(body) > 1000 else len(body)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
        if fault in ("reset", "truncate", "short_length"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        if fault in ("reset", "truncate"):
            body = body[:len(body) // 2]
        elif fault == "short_length":
            body = body[:length]
        self.wfile.write(body)
        self.wfile.flush()
        owner.count(rel, len(body), request=False)
        if fault == "reset":  # close with SO_LINGER 0: the client sees a TCP reset, not an orderly end
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # injected resets and timed-out clients make the handler's writes fail: expected here


class FaultServer:
    """A folder served on 127.0.0.1 (see the module docstring); use as a context manager."""

    def __init__(self, root: Path, faults: Faults | None = None):
        self.root = Path(root).resolve()
        self.faults = faults or Faults()
        self.requests: Counter = Counter()
        self.bytes_sent: Counter = Counter()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, rel: str, n: int, request: bool = True) -> None:
        with self._lock:
            self.requests[rel] += request
            self.bytes_sent[rel] += n

    def __enter__(self) -> FaultServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class MotoS3:
    """moto's S3 server on 127.0.0.1 and the fsspec options that reach it."""

    endpoint: str
    server: object

    @property
    def storage_options(self) -> dict:
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "eu-west-1"}}

    def upload(self, local: Path, bucket: str, prefix: str) -> str:
        """Copy a folder into ``s3://bucket/prefix``; returns that url."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options)
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            fs.pipe_file(f"{bucket}/{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())
        fs.invalidate_cache()
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        self.server.stop()


def _serve_moto(conn) -> None:
    """Child process: moto's server, its port sent back, then serve until terminated."""
    import logging
    import time

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port())
    while True:
        time.sleep(3600)


class _MotoProcess:
    def __init__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_moto, args=(child,), daemon=True)
        self.process.start()
        if not parent.poll(120):
            self.stop()
            raise RuntimeError("moto's server did not start within 120 s")
        self.host, self.port = parent.recv()

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def moto_s3(own_process: bool = False) -> MotoS3:
    """moto's S3 server in a thread of this process, or (``own_process``) in a process of its own: a test that
    drives many requests from this process then does not share the GIL with the server (~4x faster requests)."""
    if own_process:
        proc = _MotoProcess()
        return MotoS3(f"http://{proc.host}:{proc.port}", proc)

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return MotoS3(f"http://{host}:{port}", server)
