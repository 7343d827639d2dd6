"""Which files decided a build's train/val/test splits: the record a source leaves, and its one-line description.

A reader that can take its splits from several places (PASTIS-HD: MAESTRO's split CSVs or the ``Fold`` column of
``metadata.geojson``) records what it used; the build keeps the record in the store's provenance, the build
report and the shard index, and ``maestro-data info`` prints it. Records are plain JSON:

* ``{"rule": "csv", "fold": None | k, "files": [...], "missing": [...]}``: split CSVs (paths relative to the
  source root; a missing one leaves its split empty);
* ``{"rule": "folds", "fold": None | k, "files": ["metadata.geojson"], "assignment": {"train": [1, 2, 3], ...}}``;
* ``{"rule": "legacy", "fold": k | None}``: built before records existed (the fold option is all we know; None
  for shards whose index does not say).
"""

from __future__ import annotations

from typing import Any

OFFICIAL_DEFAULT = "train.csv / val.csv / test.csv"


def csv_origin(files: list[str], missing: list[str], fold: int | None) -> dict[str, Any]:
    return {"rule": "csv", "fold": fold, "files": list(files), "missing": list(missing)}


def folds_origin(table: str, assignment: dict[str, list[int]], fold: int | None) -> dict[str, Any]:
    return {"rule": "folds", "fold": fold, "files": [table], "assignment": {k: list(v) for k, v in assignment.items()}}


def stored_origin(provenance: dict[str, Any], by_folds: bool) -> dict[str, Any] | None:
    """The record of a store's provenance; for a fold-split dataset built before records existed, a ``legacy``
    record with the fold it was built with (None for other datasets without a record)."""
    if "splits" in provenance:  # recorded (None: the reader had no choice to record)
        return provenance["splits"]
    if not by_folds:
        return None
    return {"rule": "legacy", "fold": (provenance.get("source_options") or {}).get("fold")}


def is_old_default(origin: dict[str, Any] | None) -> bool:
    """Whether the splits came from the old default (``--fold 1`` implied), which differs from the official one
    on a source holding both MAESTRO's default split files and fold files."""
    return origin is not None and origin.get("rule") == "legacy" and origin.get("fold") in (1, None)


def describe(origin: dict[str, Any] | None) -> str | None:
    """One line for humans: which files decided the splits (None when nothing was recorded)."""
    if origin is None:
        return None
    rule, fold = origin.get("rule"), origin.get("fold")
    fold_text = f"--fold {fold}" if fold is not None else "no --fold"
    if rule == "csv":
        text = ", ".join(origin["files"]) + f" ({fold_text})"
        if origin.get("missing"):
            text += f"; missing, so empty: {', '.join(origin['missing'])}"
        return text
    if rule == "folds":
        table = ", ".join(f"{split} {folds}" for split, folds in origin["assignment"].items())
        wanted = OFFICIAL_DEFAULT if fold is None else f"{{stage}}_fold_{fold}.csv"
        return f"{origin['files'][0]} Fold column: {table} ({fold_text}; no {wanted} in the source)"
    if rule == "legacy":
        used = f"--fold {fold}" if fold is not None else "--fold 1 unless another fold was given"
        shown = fold if fold is not None else "k"
        text = (f"not recorded (built before split origins were recorded, with {used}: "
                f"{{stage}}_fold_{shown}.csv when the source held them, else the Fold column)")
        if is_old_default(origin):
            text += (f"; this was the OLD split default (--fold 1 implied), not the official one ({OFFICIAL_DEFAULT} "
                     "when present): rebuild without --fold to follow the official reader, or with --fold 1 to keep "
                     "these splits")
        return text
    return f"unknown split record {origin!r}"
