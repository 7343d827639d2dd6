"""The shard index, schema 3: O(shards) where every process reads it, per-sample detail in one sidecar per shard.

``index.json`` (written last: the commit marker) is read by every rank and worker, so it holds only what planning
an epoch needs, as one column per field for each split and tier (no per-sample entry)::

    {"format": "maestro-shards", "schema": 3, "toolkit_version", "seed", "labelled" (false: --no-targets),
     "manifest": {"name", "sha256", "text"},
     "splits": {<split>: {"samples": n, "subsets": {"5": n, ...},
                          "tiers": {<tier>: {"url": [...], "samples": [...], "bytes": [...], "sha256": [...],
                                             "sidecar_bytes": [...], "sidecar_sha256": [...]}}}}}

Per shard ``<split>/<tier>-<n>.tar`` a sidecar ``<split>/<tier>-<n>.samples.json`` lists its samples as compact
arrays: ``keys``, ``tile_ids`` and ``layout``, a flat integer array of one row per sample ``[start, off_1, size_1,
..., off_F, size_F]`` (byte offset of the sample's first tar header, then per field of ``fields`` the offset of the
member's data relative to ``start`` and its size; field ``json`` is the metadata member). Only the process that
reads a shard fetches its sidecar, and checks it against the index's ``sidecar_bytes`` and ``sidecar_sha256``
before parsing it. Everything here is checked field by field: a malformed index or sidecar is one ``ShardError``
naming the file, the field and what was expected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import quote, unquote

import numpy as np

from maestro_data.errors import ShardError

INDEX_NAME = "index.json"
INDEX_FORMAT = "maestro-shards"
INDEX_SCHEMA = 3  # 3: each sample's metadata holds its grids (georeference); index "labelled"
SIDECAR_FORMAT = "maestro-shard-samples"
SIDECAR_SUFFIX = ".samples.json"
COLUMNS = ("url", "samples", "bytes", "sha256", "sidecar_bytes", "sidecar_sha256")
MAX_INDEX_BYTES = 512 << 20  # ~70x a 10 M-tile index: anything larger is not an index of ours
MAX_SIDECAR_BYTES = 256 << 20

HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY = re.compile(r"^[A-Za-z0-9_%-]+$")  # sample keys as sample_key (below) writes them
FIELD = re.compile(r"^[A-Za-z0-9_]+$")  # a member's field name (``json`` for the metadata)
NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # split names
TIER = re.compile(r"^[0-9]{1,3}$")


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _fail(where: str, path: str, expected: str, got: object) -> NoReturn:
    raise ShardError(f"{where}: {f'field {path}' if path else 'top level'}: expected {expected}, got {_show(got)}")


def _dict(where: str, value: object, path: str, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        _fail(where, path, "an object", value)
    for name in required:
        if name not in value:
            raise ShardError(f"{where}: field {f'{path}.{name}' if path else name} is missing")
    return value


def _int(where: str, value: object, path: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        _fail(where, path, f"an integer >= {low}", value)
    return value


def _str(where: str, value: object, path: str, rule: re.Pattern | None = None, expected: str = "a string") -> str:
    if not isinstance(value, str) or (rule is not None and not rule.match(value)):
        _fail(where, path, expected, value)
    return value


def load_json(raw: bytes, what: str) -> object:
    """JSON from untrusted bytes: every way it can be malformed is one ShardError naming ``what``."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ShardError(f"{what}: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError, so are over-long integers
        raise ShardError(f"{what}: not valid UTF-8 JSON: {exc}") from None


def relative_url_problem(url: str) -> str | None:
    """Why ``url`` is not a plain relative path inside the shard folder (None when it is)."""
    if "://" in url or ":" in url.split("/", 1)[0] or url.startswith("/") or "\\" in url:
        return "is not a relative path inside the shard folder"
    if ".." in url.split("/") or "" in url.split("/"):
        return "is not a relative path inside the shard folder"
    return None


def check_column(where: str, values: object, path: str, kind: str, n: int | None) -> list:
    if not isinstance(values, list) or (n is not None and len(values) != n):
        _fail(where, path, "a list" + (f" of {n} values (one per shard)" if n is not None else ""), values)
    if kind == "int":
        if not all(type(v) is int and v >= 0 for v in values):
            i = next(i for i, v in enumerate(values) if type(v) is not int or v < 0)
            _int(where, values[i], f"{path}[{i}]")
    elif kind == "hex":
        if not all(isinstance(v, str) and HEX64.match(v) for v in values):
            i = next(i for i, v in enumerate(values) if not (isinstance(v, str) and HEX64.match(v)))
            _fail(where, f"{path}[{i}]", "a sha256 as 64 lowercase hex digits", values[i])
    else:
        for i, v in enumerate(values):
            _str(where, v, f"{path}[{i}]")
            problem = relative_url_problem(v) or (None if v.endswith(".tar") else "does not end in .tar")
            if problem:
                raise ShardError(f"{where}: field {path}[{i}]: shard url {v!r} {problem}")
    return values


def _check_tier(where: str, columns: object, path: str) -> int:
    columns = _dict(where, columns, path, COLUMNS)
    n = len(check_column(where, columns["url"], f"{path}.url", "url", None))
    for name in COLUMNS[1:]:
        check_column(where, columns[name], f"{path}.{name}", "hex" if name.endswith("sha256") else "int", n)
    if 0 in columns["sidecar_bytes"]:
        _fail(where, f"{path}.sidecar_bytes", "sizes >= 1", 0)
    return sum(columns["samples"])


def check_index(index: object, where: str) -> dict:
    """``index`` if it is a schema-3 index; otherwise one ShardError naming ``where``, the field and what was
    expected (schema 1, which kept per-sample lists inline, is refused with how to rewrite it)."""
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{where}: not a maestro shard index (expected an object with format {INDEX_FORMAT!r})")
    schema = index.get("schema")
    if schema == 1:
        folder = where.rsplit("/", 1)[0] if "/" in where else "."
        raise ShardError(f"{where}: index schema 1 (per-sample lists inline) is no longer read; rewrite the index "
                         f"without rebuilding the shards: maestro-data reindex {folder}")
    if schema == 2:
        raise ShardError(f"{where}: index schema 2 (samples without their georeference) is no longer read; rebuild "
                         "the store and shards: maestro-data build ... --overwrite")
    if schema != INDEX_SCHEMA:
        raise ShardError(f"{where}: unknown index schema version {schema!r} (this toolkit reads {INDEX_SCHEMA})")
    if not isinstance(index.get("labelled", True), bool):
        _fail(where, "labelled", "true or false", index["labelled"])
    _dict(where, index, "", ("toolkit_version", "seed", "manifest", "splits"))
    _str(where, index["toolkit_version"], "toolkit_version")
    _int(where, index["seed"], "seed")
    manifest = _dict(where, index["manifest"], "manifest", ("name", "sha256", "text"))
    _str(where, manifest["name"], "manifest.name")
    _str(where, manifest["sha256"], "manifest.sha256", HEX64, "a sha256 as 64 lowercase hex digits")
    _str(where, manifest["text"], "manifest.text")
    splits = _dict(where, index["splits"], "splits")
    if not splits:
        _fail(where, "splits", "at least one split", splits)
    for split, info in splits.items():
        path = f"splits.{split}"
        _str(where, split, path, NAME, "a split name of letters, digits, _ and -")
        info = _dict(where, info, path, ("samples", "subsets", "tiers"))
        subsets = _dict(where, info["subsets"], f"{path}.subsets")
        for p, count in subsets.items():
            _str(where, p, f"{path}.subsets", TIER, "percentages as whole numbers")
            _int(where, count, f"{path}.subsets.{p}")
        tiers = _dict(where, info["tiers"], f"{path}.tiers")
        total = 0
        for tier, columns in tiers.items():
            if not TIER.match(tier) or not 1 <= int(tier) <= 100:
                _fail(where, f"{path}.tiers", "tier names that are percentages 1..100", tier)
            total += _check_tier(where, columns, f"{path}.tiers.{tier}")
        if _int(where, info["samples"], f"{path}.samples") != total:
            raise ShardError(f"{where}: field {path}.samples: {info['samples']}, but its shards hold {total}")
    return index


def shard_columns(index: dict, split: str, subset: int = 100) -> dict[str, list]:
    """The columns of the shards that make up ``subset`` % of ``split`` (the union of tiers <= subset)."""
    if split not in index["splits"]:
        raise ShardError(f"index has no split {split!r} (splits: {', '.join(index['splits'])})")
    tiers = index["splits"][split]["tiers"]
    if subset != 100 and str(subset) not in tiers:
        raise ShardError(f"index has no {subset} % subset for {split!r} (tiers: {', '.join(tiers)})")
    chosen = sorted((t for t in tiers if int(t) <= subset), key=int)
    return {name: [v for t in chosen for v in tiers[t][name]] for name in COLUMNS}


def shard_entries(index: dict, split: str, subset: int = 100) -> list[dict]:
    """The same shards as one dict per shard (for tools and tests; the stream keeps columns)."""
    columns = shard_columns(index, split, subset)
    return [dict(zip(COLUMNS, row, strict=True)) for row in zip(*(columns[c] for c in COLUMNS), strict=True)]


def all_entries(index: dict) -> list[dict]:
    """Every shard of the index, as (split, tier, entry) dicts with ``split`` and ``tier`` added."""
    out = []
    for split, info in index["splits"].items():
        for tier, columns in sorted(info["tiers"].items(), key=lambda kv: int(kv[0])):
            for row in zip(*(columns[c] for c in COLUMNS), strict=True):
                out.append({"split": split, "tier": tier, **dict(zip(COLUMNS, row, strict=True))})
    return out


def index_bytes(index: dict) -> bytes:
    """``index.json``'s bytes: compact, since every process of a run parses it."""
    return json.dumps(index, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sidecar_url(shard: str) -> str:
    """The sidecar beside a shard: ``a/b-00000.tar`` -> ``a/b-00000.samples.json``."""
    return shard.removesuffix(".tar") + SIDECAR_SUFFIX


@dataclass(frozen=True)
class Sidecar:
    """One shard's samples: keys, tile ids, member fields and the (samples, 1 + 2·fields) int64 layout."""

    keys: tuple[str, ...]
    tile_ids: tuple[str, ...]
    fields: tuple[str, ...]
    layout: np.ndarray


def encode_sidecar(shard_sha256: str, keys: list[str], tile_ids: list[str], fields: list[str],
                   layout: list[int]) -> bytes:
    """The sidecar's bytes (deterministic: sorted keys, no whitespace)."""
    body = {"format": SIDECAR_FORMAT, "schema": INDEX_SCHEMA, "shard_sha256": shard_sha256, "samples": len(keys),
            "keys": keys, "tile_ids": tile_ids, "fields": fields, "layout": layout}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_sidecar(raw: bytes, where: str, samples: int, shard_sha256: str, tile_id_of) -> Sidecar:
    """A sidecar's content, checked: format, the shard it describes, ``samples`` unique keys whose tile ids are
    ``tile_id_of(key)``, unique field names, one non-negative integer row per sample. Offsets are checked against
    the shard by ``layout.spans_from_sidecar``."""
    body = _dict(where, load_json(raw, where), "",
                 ("format", "schema", "shard_sha256", "samples", "keys", "tile_ids", "fields", "layout"))
    if body["format"] != SIDECAR_FORMAT or body["schema"] != INDEX_SCHEMA:
        _fail(where, "format", f"{SIDECAR_FORMAT!r} schema {INDEX_SCHEMA}", (body["format"], body["schema"]))
    if body["shard_sha256"] != shard_sha256:
        raise ShardError(f"{where}: describes shard {str(body['shard_sha256'])[:12]}..., the index's shard is "
                         f"{shard_sha256[:12]}...")
    if _int(where, body["samples"], "samples") != samples:
        raise ShardError(f"{where}: field samples: {body['samples']}, the index says {samples}")
    keys, ids, fields = body["keys"], body["tile_ids"], body["fields"]
    for name, values in (("keys", keys), ("tile_ids", ids)):
        if not isinstance(values, list) or len(values) != samples:
            _fail(where, name, f"a list of {samples} strings", values)
    for i, (key, tile_id) in enumerate(zip(keys, ids, strict=True)):
        _str(where, key, f"keys[{i}]", KEY, "a sample key of letters, digits, _, - and %")
        if not isinstance(tile_id, str) or tile_id_of(key) != tile_id:
            _fail(where, f"tile_ids[{i}]", f"the tile id of key {key!r}", tile_id)
    if len(set(keys)) != len(keys):
        raise ShardError(f"{where}: field keys: duplicate sample keys")
    if not isinstance(fields, list) or not fields or len(set(map(str, fields))) != len(fields):
        _fail(where, "fields", "a non-empty list of distinct field names", fields)
    for i, f in enumerate(fields):
        _str(where, f, f"fields[{i}]", FIELD, "a field name of letters, digits and _")
    width = 1 + 2 * len(fields)
    check_column(where, body["layout"], "layout", "int", samples * width)
    try:
        layout = np.asarray(body["layout"], dtype=np.int64).reshape(samples, width)
    except OverflowError:
        _fail(where, "layout", "offsets and sizes that fit 64 bits", max(body["layout"]))
    return Sidecar(tuple(keys), tuple(ids), tuple(fields), layout)


def sample_key(tile_id: str) -> str:
    """Reversible, tar- and webdataset-safe key: every character outside [A-Za-z0-9_-] is percent-encoded."""
    return quote(tile_id, safe="").replace(".", "%2E").replace("~", "%7E")


def tile_id_of(key: str) -> str:
    return unquote(key)
