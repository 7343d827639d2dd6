"""Date parsing shared by the readers: every date becomes int16 (year, day of year, hour)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1 << 16)  # dates repeat across the tiles of a dataset; strptime dominated build profiles
def parse_date(text: str | int) -> tuple[int, int, int]:
    """``YYYYMMDD`` or ``YYYYMMDDTHHMMSS`` (int or str) -> (year, day of year, hour).

    A day of ``00`` (seen in FLAIR-HUB aerial dates) is read as the first of the month, as the official reader does.
    Raises ValueError with the offending text.
    """
    s = str(text).strip()
    if len(s) >= 8 and s[:8].isdigit():
        try:
            d = date(int(s[:4]), int(s[4:6]), int(s[6:8]) or 1)
        except ValueError:
            raise ValueError(f"invalid date {s!r}: expected YYYYMMDD") from None
        hour = 0
        if len(s) >= 11 and s[8] == "T" and s[9:11].isdigit():
            hour = int(s[9:11])
            if hour > 23:
                raise ValueError(f"invalid hour in {s!r}")
        return d.year, d.timetuple().tm_yday, hour
    try:
        d = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"invalid date {s!r}: expected YYYYMMDD or YYYY-MM-DD") from None
    return d.year, d.timetuple().tm_yday, d.hour


def iso_day(ymd: Iterable[int]) -> str:
    """(year, day of year, hour) -> ``YYYY-MM-DD``; ``no date`` for the zero row of a modality without dates."""
    year, doy = (int(v) for v in list(ymd)[:2])
    if year <= 0:
        return "no date"
    return (date(year, 1, 1) + timedelta(days=doy - 1)).isoformat()


def dates_array(values: Iterable[str | int]) -> np.ndarray:
    """Many dates -> (T, 3) int16."""
    rows = [parse_date(v) for v in values]
    return np.asarray(rows, dtype=np.int16).reshape(len(rows), 3)
