"""Encoder sequences and MAE masking (model-spec §3.1 and §4).

Per modality, tokens are ``[B, G*D, L, ...]`` (band group, date, position). A *sequence* is what one encoder call sees:
folded modes (shared, monotemp) make one sequence per (sample, band group, date); mod/group concatenate their member
modalities date-major per sample. Masks are bool with True = hidden, drawn in two stages: structured masks (modality,
band group, date, spatial tube) with rejection of fully-masked sequences, then an exact count round(r*L) per sequence.
All randomness comes from the caller's ``torch.Generator``, which is required: torch's global RNG is never used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRIMS = ("official", "random")


@dataclass(frozen=True)
class MaskConfig:
    """Masking hyper-parameters (official defaults, ``conf/mask.py``); a probability of None disables that mask."""

    ratio: float = 0.75
    scale: float = 0.0
    p_mod: float | None = 0.25
    p_bands: float | None = None
    p_dates: float | None = 0.25
    p_loc: float | None = 0.25
    trim: str = "official"


@dataclass(frozen=True)
class TokenLayout:
    """Token geometry of one modality: band groups G, dates D, spatial tokens L."""

    name: str
    bands: int
    dates: int
    tokens: int

    @property
    def pseudo_dates(self) -> int:
        return self.bands * self.dates


@dataclass(frozen=True)
class Sequence:
    """One encoder sequence family: its key, member modalities (in modality order) and whether dates are folded."""

    name: str
    members: tuple[str, ...]
    folded: bool

    def length(self, layouts: dict[str, TokenLayout]) -> int:
        if self.folded:
            return layouts[self.members[0]].tokens
        return sum(layouts[m].pseudo_dates * layouts[m].tokens for m in self.members)


def to_rows(per_mod: dict[str, torch.Tensor], seq: Sequence) -> torch.Tensor:
    """Per-modality ``[B, G*D, L, ...]`` -> sequence rows ``[N, L_seq, ...]``."""
    if seq.folded:
        x = per_mod[seq.members[0]]
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return torch.cat([per_mod[m].flatten(1, 2) for m in seq.members], dim=1)


def from_rows(rows: torch.Tensor, seq: Sequence, layouts: dict[str, TokenLayout]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_rows`."""
    if seq.folded:
        lay = layouts[seq.members[0]]
        return {lay.name: rows.reshape(-1, lay.pseudo_dates, *rows.shape[1:])}
    sizes = [layouts[m].pseudo_dates * layouts[m].tokens for m in seq.members]
    parts = rows.split(sizes, dim=1)
    return {m: p.reshape(p.shape[0], layouts[m].pseudo_dates, layouts[m].tokens, *p.shape[2:])
            for m, p in zip(seq.members, parts, strict=True)}


def mask_ratio(seq: Sequence, layouts: dict[str, TokenLayout], cfg: MaskConfig) -> float:
    """Target ratio r = 1 - (1 - ratio) / N^scale with N the pseudo-dates of the sequence (official §4.1)."""
    n = 1 if seq.folded else sum(layouts[m].pseudo_dates for m in seq.members)
    return 1 - (1 - cfg.ratio) / n**cfg.scale


def num_masked(seq: Sequence, layouts: dict[str, TokenLayout], cfg: MaskConfig) -> int:
    """round(r * L) with Python's half-to-even rounding, identical for every sample."""
    return round(mask_ratio(seq, layouts, cfg) * seq.length(layouts))


def structured_probabilities(seq: Sequence, layouts: dict[str, TokenLayout],
                             cfg: MaskConfig) -> dict[str, dict[str, float | None]]:
    """Active structured-mask probabilities per member modality (§4.1): none for folded sequences; modality masking
    only inside multi-modality sequences; band masking only for G > 1; date masking only for D > 1."""
    out = {}
    for m in seq.members:
        lay = layouts[m]
        if seq.folded:
            out[m] = {"mod": None, "bands": None, "dates": None, "loc": None}
            continue
        out[m] = {"mod": cfg.p_mod if len(seq.members) > 1 else None,
                  "bands": cfg.p_bands if lay.bands > 1 else None,
                  "dates": cfg.p_dates if lay.dates > 1 else None,
                  "loc": cfg.p_loc}
    return out


def _device_of(generator: torch.Generator) -> torch.device:
    """The device masks are drawn on; refuses a missing generator (no silent fallback to the global RNG)."""
    if not isinstance(generator, torch.Generator):
        raise ValueError("mask sampling needs an explicit generator, e.g. torch.Generator(device).manual_seed(seed); "
                         f"got {generator!r}")
    return generator.device


def _bern(shape: tuple[int, ...], p: float | None, generator: torch.Generator) -> torch.Tensor:
    device = _device_of(generator)
    if p is None:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return torch.rand(shape, generator=generator, device=device) < p


def draw_structured(lay: TokenLayout, probs: dict[str, float | None], batch: int,
                    generator: torch.Generator) -> torch.Tensor:
    """One draw of the OR of modality / band-group / date / spatial-tube masks -> ``[B, G*D, L]`` bool."""
    b, g, d, n = batch, lay.bands, lay.dates, lay.tokens
    m = _bern((b, 1, 1, 1), probs["mod"], generator)
    m = m | _bern((b, g, 1, 1), probs["bands"], generator)
    m = m | _bern((b, 1, d, 1), probs["dates"], generator)
    m = m | _bern((b, 1, 1, n), probs["loc"], generator)
    return m.reshape(b, g * d, n)


def structured_masks(sequences: list[Sequence], layouts: dict[str, TokenLayout], cfg: MaskConfig, batch: int,
                     generator: torch.Generator, max_rounds: int = 10_000) -> dict[str, torch.Tensor]:
    """Structured masks per modality, redrawing every (sample, sequence) that would be fully masked (§4.2)."""
    out: dict[str, torch.Tensor] = {}
    for seq in sequences:
        probs = structured_probabilities(seq, layouts, cfg)
        current = {m: draw_structured(layouts[m], probs[m], batch, generator) for m in seq.members}
        if seq.folded:
            out.update(current)
            continue
        for _ in range(max_rounds):
            bad = to_rows(current, seq).all(dim=1)
            if not bad.any():
                break
            new = {m: draw_structured(layouts[m], probs[m], batch, generator) for m in seq.members}
            current = {m: torch.where(bad[:, None, None], new[m], current[m]) for m in seq.members}
        else:
            raise RuntimeError(f"sequence {seq.name!r}: structured masks stay fully masked after {max_rounds} draws")
        out.update(current)
    return out


def exact_count(structured: torch.Tensor, n_mask: int, trim: str, generator: torch.Generator) -> torch.Tensor:
    """Rows ``[N, L]`` of structured masks -> final masks with exactly ``n_mask`` True per row (§4.3).

    Structured tokens come first, then random ones. When more than ``n_mask`` are structured, ``official`` keeps the
    lowest indices masked (the authors' stable GPU sort) and ``random`` keeps a uniformly random subset (paper).
    """
    if trim not in TRIMS:
        raise ValueError(f"trim must be one of {', '.join(TRIMS)}, got {trim!r}")
    device = _device_of(generator)
    noise = torch.rand(structured.shape, generator=generator, device=device)
    s = structured.to(device)
    key = torch.where(s, noise - 1, noise) if trim == "random" else torch.where(s, torch.full_like(noise, -1), noise)
    order = torch.argsort(key, dim=1, stable=True)
    mask = torch.zeros_like(s)
    mask.scatter_(1, order[:, :n_mask], True)
    return mask.to(structured.device)


def visible_index(mask_rows: torch.Tensor, n_visible: int) -> torch.Tensor:
    """Positions ``[N, n_visible]`` of the visible (False) tokens of mask rows ``[N, L]``, ascending in every row.

    A stable sort of the 0/1 mask puts the visible tokens first in their original order, with a shape known in
    advance: no boolean indexing, hence no host-device sync and no data-dependent shape (meta device, compile).
    Every row must have exactly ``n_visible`` visible tokens (not checked here: checking would need a sync).
    """
    return torch.argsort(mask_rows.to(torch.uint8), dim=1, stable=True)[:, :n_visible]


def sample_masks(sequences: list[Sequence], layouts: dict[str, TokenLayout], cfg: MaskConfig, batch: int,
                 generator: torch.Generator,
                 device: torch.device | str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Final and structured token masks per modality, each ``[B, G*D, L]`` bool (on ``device``)."""
    struct = structured_masks(sequences, layouts, cfg, batch, generator)
    final: dict[str, torch.Tensor] = {}
    for seq in sequences:
        rows = exact_count(to_rows(struct, seq), num_masked(seq, layouts, cfg), cfg.trim, generator)
        final.update(from_rows(rows, seq, layouts))
    if device is not None:
        # the masks are fresh and never written again: an asynchronous upload needs no stream sync
        final = {m: v.to(device, non_blocking=True) for m, v in final.items()}
        struct = {m: v.to(device, non_blocking=True) for m, v in struct.items()}
    return final, struct
