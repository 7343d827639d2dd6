"""Band groups and normalisation factors proposed from band statistics, and a manifest copy that uses them.

**Groups.** The paper chooses its patch-group normalisation from band correlations (Fig. 6, Table 2). We cluster
a modality's model bands (its ``select``) hierarchically: distance ``1 - |r|`` between two bands, average linkage
(the mean distance between the members of two clusters; scipy.cluster.hierarchy), tree cut at
``GROUP_DISTANCE``: bands end up together when they correlate on average with |r| >= 0.8 (anticorrelated bands
carry the same information and are grouped too). On the real TreeSatAI-TS tiles this cut gives the manifest's
groups for every modality (S2 [4, 4, 2] for cuts 0.09 to 0.4; aerial NIR | G B R from 0.15 to 0.25; S1 VV | VH);
only real data can tell (the bands of the synthetic layouts are not physically related). Groups are ordered by
their first band; a manifest's ``norm_groups`` count consecutive model bands, so groups that are not runs of the
current order come with a ``select`` that reorders the bands to make them runs (this changes the model's input
order: a pretrained checkpoint expects the old one).

**Factors.** The official factors are round numbers near the top of a modality's value range: 255 for 8-bit
imagery, 5000 or 10000 for Sentinel-2 reflectance x 1e4, 5 for log backscatter, 20 for backscatter in dB. Ours:
8-bit integer modalities keep 255, their full range; any other modality gets the number of the 1-2-5 series
(1, 2, 5, 10, 20, ...) nearest in ratio to the largest magnitude among its model bands' 1st and 99th
percentiles, taken where the factor applies (after ``log`` for ``log_scale`` modalities).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from maestro_data.errors import MaestroError, ManifestError
from maestro_data.manifest import Manifest, ModalitySpec, parse_manifest

GROUP_DISTANCE = 0.2
PROPOSED = "# proposed by maestro-data stats"


@dataclass(frozen=True)
class Proposal:
    """Proposed ``select`` (stored band indices, in model order), ``norm_groups`` and ``norm_factor``."""

    select: tuple[int, ...]
    norm_groups: tuple[int, ...]
    norm_factor: float

    def groups(self, bands: tuple[str, ...]) -> list[list[str]]:
        out, start = [], 0
        for size in self.norm_groups:
            out.append([bands[i] for i in self.select[start:start + size]])
            start += size
        return out


def cluster_bands(corr: np.ndarray, distance: float = GROUP_DISTANCE) -> list[list[int]]:
    """Groups of band positions (rows of ``corr``) from average-linkage clustering of ``1 - |r|`` cut at
    ``distance``, each sorted, ordered by their first member. A band without variance (NaN row) stays alone."""
    try:
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform
    except ImportError:
        raise MaestroError("band groups need scipy: pip install 'maestro-eo[plots]'") from None

    n = corr.shape[0]
    if n == 1:
        return [[0]]
    d = 1.0 - np.abs(np.nan_to_num(corr, nan=0.0))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    labels = fcluster(linkage(squareform(np.clip(d, 0.0, None), checks=False), method="average"), t=distance,
                      criterion="distance")
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def nice_factor(value: float) -> float:
    """The 1-2-5 series number (..., 0.5, 1, 2, 5, 10, ...) nearest to ``value`` in ratio (1 for no value)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    candidates = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 2, 5)]
    return min(candidates, key=lambda c: abs(math.log(value / c)))


def propose(spec: ModalitySpec, corr_model: np.ndarray, p1: np.ndarray, p99: np.ndarray,
            distance: float = GROUP_DISTANCE) -> Proposal:
    """The proposal for one modality from the correlation of its model bands (in ``select`` order) and the
    1st / 99th percentiles of its stored bands."""
    groups = cluster_bands(corr_model, distance)
    select = tuple(spec.select[i] for g in groups for i in g)
    if np.dtype(spec.dtype) == np.uint8:
        factor = float(np.iinfo(np.uint8).max)
    else:
        tops = np.abs(np.concatenate([p1[list(spec.select)], p99[list(spec.select)]]))
        factor = nice_factor(float(np.nanmax(tops)) if np.isfinite(tops).any() else float("nan"))
    return Proposal(select=select, norm_groups=tuple(len(g) for g in groups), norm_factor=factor)


_HEADER = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+\s*(#.*)?$")


def _format(value: tuple[int, ...] | float) -> str:
    return f"[{', '.join(str(v) for v in value)}]" if isinstance(value, tuple) else repr(float(value))


def _set_keys(text: str, table: str, values: dict[str, str]) -> str:
    """``text`` with the ``key = value`` lines of TOML table ``table`` replaced or added at the table's end (their old
    comments dropped: they described the old values); the table is appended when the text has none (a variant
    manifest that extends a base). Every other line, comments included, is kept."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if (m := _HEADER.match(line)) and m.group(1) == table), None)
    if start is None:
        return text.rstrip("\n") + f"\n\n[{table}]\n" + "".join(f"{k} = {v}   {PROPOSED}\n" for k, v in values.items())
    end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
    todo = dict(values)
    for i in range(start + 1, end):
        key = lines[i].split("=", 1)[0].strip()
        if key in todo and "=" in lines[i]:
            lines[i] = f"{key} = {todo.pop(key)}   {PROPOSED}"
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    lines[end:end] = [f"{k} = {v}   {PROPOSED}" for k, v in todo.items()]
    return "\n".join(lines) + "\n"


def manifest_with(manifest: Manifest, proposals: dict[str, Proposal]) -> str:
    """The manifest's own text with each proposed ``norm_factor``, ``norm_groups`` (and ``select`` where the groups
    reorder the bands) written in, comments kept; checked by parsing it back."""
    text = manifest.text
    for name, p in proposals.items():
        values = {"norm_factor": _format(p.norm_factor), "norm_groups": _format(p.norm_groups)}
        if p.select != manifest.modalities[name].select:
            values["select"] = _format(p.select)
        text = _set_keys(text, f"modalities.{name}", values)
    parsed = parse_manifest(text, origin=f"{manifest.name} with proposed norm factors and groups")
    for name, p in proposals.items():
        got = parsed.modalities[name]
        if (got.select, got.norm_groups, got.norm_factor) != (p.select, p.norm_groups, p.norm_factor):
            raise ManifestError(f"{manifest.name}: could not write the proposal for modalities.{name} into the "
                                "manifest text (edit it by hand)")
    return text
