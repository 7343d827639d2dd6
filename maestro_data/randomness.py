"""Randomness as a pure function of (seed, epoch, sample key, purpose): never of worker, rank or call order.

Every random choice of the stream (crop, temporal offset, time step, D4 element) draws from
``sample_rng(seed, epoch, key, stream)``, so a sample gets the same augmentation with 1 or 512 ranks and any
number of workers. Shard and sample orders come from ``permutation``, a counter-based bijective hash (Grain's
``index_shuffle`` idea: pure and stateless; here materialised as one int64 array) whose result is bit-identical
on every platform and numpy version, because it is plain uint64 arithmetic followed by an argsort of distinct
keys.
"""

from __future__ import annotations

import hashlib

import numpy as np

_DOMAIN_RNG = b"maestro.sample_rng.v1"
_DOMAIN_PERM = b"maestro.permutation.v1"
_MASK64 = (1 << 64) - 1
_RNG_PREFIX = hashlib.sha256(_DOMAIN_RNG)  # fed once: each call copies it (its own state, same digest)


def _check_counter(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _digest(domain: bytes, *parts: str) -> bytes:
    """SHA-256 of length-prefixed UTF-8 parts: no two distinct part tuples share an encoding."""
    h = _RNG_PREFIX.copy() if domain == _DOMAIN_RNG else hashlib.sha256(domain)
    for part in parts:
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.digest()


def sample_rng(seed: int, epoch: int, key: str, stream: str = "", *,
               reuse: np.random.Generator | None = None) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, epoch, sample key, purpose ``stream``).

    Use one ``stream`` name per kind of choice ("crop", "temporal:s2", "d4") so that adding a draw to one
    choice never shifts another. The bit generator is Philox (counter-based, made for one key per task) keyed by
    128 bits of SHA-256 over all four inputs: about half the cost of seeding through a SeedSequence. The bit
    stream is fixed; distribution methods follow numpy's stability policy, so pin numpy across one run's nodes.

    ``reuse``: a Philox Generator (e.g. an earlier result) that is re-keyed in place and returned, drawing exactly
    what a fresh one would: building a Philox costs ~30 µs (it gathers OS entropy before the key replaces it),
    more than the stream's other per-sample work on small modalities. Only for a caller done with its last draw.
    """
    seed = _check_counter("seed", seed)
    epoch = _check_counter("epoch", epoch)
    if not isinstance(key, str) or not isinstance(stream, str):
        raise TypeError(f"key and stream must be strings, got {type(key).__name__} and {type(stream).__name__}")
    digest = _digest(_DOMAIN_RNG, str(seed), str(epoch), key, stream)
    philox_key = np.frombuffer(digest[:16], dtype="<u8")
    if reuse is None:
        return np.random.Generator(np.random.Philox(key=philox_key))
    # a fresh Philox's state: counter 0, empty buffer (nothing cached in the Generator itself)
    reuse.bit_generator.state = {"bit_generator": "Philox", "state": {"counter": np.zeros(4, np.uint64),
                                 "key": philox_key}, "buffer": np.zeros(4, np.uint64), "buffer_pos": 4,
                                 "has_uint32": 0, "uinteger": 0}
    return reuse


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijection of uint64 with full avalanche (wrap-around arithmetic is intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation(n: int, seed: int, epoch: int, salt: str = "") -> np.ndarray:
    """A pseudo-random permutation of ``range(n)`` (int64) that is a pure function of (n, seed, epoch, salt).

    Keys ``mix(i + k1) ^ k2`` are distinct for distinct ``i`` (``mix`` is a bijection of uint64), so the argsort
    has no ties and the result does not depend on the sort algorithm. Memory is O(n); at 10^6 tiles that is 8 MB.
    """
    n = _check_counter("n", n)
    seed = _check_counter("seed", seed)
    epoch = _check_counter("epoch", epoch)
    d = _digest(_DOMAIN_PERM, str(seed), str(epoch), salt)
    k1 = np.uint64(int.from_bytes(d[:8], "little"))
    k2 = np.uint64(int.from_bytes(d[8:16], "little"))
    with np.errstate(over="ignore"):
        keys = _mix64(_mix64(np.arange(n, dtype=np.uint64) + k1) ^ k2)
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)
