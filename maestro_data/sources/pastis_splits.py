"""PASTIS-HD splits as the official reader chooses them (``maestro/dataset/utils.py::read_csv``).

* no fold configured (the default): MAESTRO's ``train.csv`` / ``val.csv`` / ``test.csv`` when any of them exists;
* ``--fold k``: ``{stage}_fold_{k}.csv`` when any of them exists;
* otherwise the paper's fold rule on the ``Fold`` column of ``metadata.geojson``: fold I = the manifest's
  ``splits.options`` (train 1-3, val 4, test 5), ``--fold k`` rotates it by k-1.

The CSVs hold one ``image`` column of ``ID_PATCH`` values. Pure helpers here; the reader does the I/O.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maestro_data.errors import SourceError

SPLIT_CSV = "{split}.csv"  # MAESTRO's default split files
FOLD_CSV = "{split}_fold_{fold}.csv"  # MAESTRO's cross-validation split files
DEFAULT_FOLD = 1  # the fold rule used when neither a fold nor the default CSVs are given


def split_csv_names(names: Sequence[str], fold: int | None) -> dict[str, str]:
    """Split name -> the CSV file name the official reader reads for ``fold`` (None: no fold configured)."""
    if fold is None:
        return {s: SPLIT_CSV.format(split=s) for s in names}
    return {s: FOLD_CSV.format(split=s, fold=fold) for s in names}


def fold_assignment(options: Mapping[str, Any], fold: int, names: Sequence[str] | None = None) -> dict[int, str]:
    """Fold number -> split name for cross-validation fold ``fold``.

    ``options`` lists fold I (e.g. train [1, 2, 3], val [4], test [5]); the N listed folds must be 1..N. Fold k
    shifts every listed number by k-1 modulo N: fold 2 = train [2, 3, 4], val [5], test [1]; fold 5 = train
    [5, 1, 2], val [3], test [4]. Raises ValueError on an inconsistent table (or a split not in ``names``) or a
    fold outside 1..N.
    """
    base: dict[int, str] = {}
    unknown = sorted(set(options) - set(names)) if names is not None else []
    if unknown:
        raise ValueError(f"{unknown} are not split names {list(names)}")
    for split, folds in options.items():
        if not isinstance(folds, list) or not all(isinstance(f, int) and not isinstance(f, bool) for f in folds):
            raise ValueError(f"{split}: expected a list of fold numbers, got {folds!r}")
        for f in folds:
            if f in base:
                raise ValueError(f"fold {f} is listed for both {base[f]!r} and {split!r}")
            base[f] = split
    n = len(base)
    if sorted(base) != list(range(1, n + 1)):
        raise ValueError(f"folds {sorted(base)} must be exactly 1..{n}")
    if not 1 <= fold <= n:
        raise ValueError(f"fold {fold} is not one of 1..{n}")
    return {(f - 1 + fold - 1) % n + 1: split for f, split in base.items()}


def assignment_table(split_of: Mapping[int, str], names: Sequence[str]) -> dict[str, list[int]]:
    """{fold: split} -> {split: sorted folds}, in split-name order (for the split record)."""
    return {s: sorted(f for f, name in split_of.items() if name == s) for s in names}


def as_int(value: Any) -> int | None:
    """An id or fold number as written by various exporters (10000, 10000.0, "10000"), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def read_image_column(path: Path) -> list[str]:
    """The ``ID_PATCH`` values of a MAESTRO split CSV's ``image`` column, as tile ids; SourceError naming the file
    and line otherwise."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = csv.DictReader(fh)
            if not rows.fieldnames or "image" not in rows.fieldnames:
                raise SourceError(f"no 'image' column (columns: {rows.fieldnames})", path=str(path))
            ids = []
            for line, row in enumerate(rows, start=2):
                number = as_int(row["image"])
                if number is None:
                    raise SourceError(f"line {line}: image {row['image']!r} is not an ID_PATCH", path=str(path))
                ids.append(str(number))
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"unreadable split CSV: {exc}", path=str(path)) from None
    return ids
