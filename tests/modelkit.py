"""Model test helpers: the small dimensions most model tests use and a random batch that follows the contract."""

from __future__ import annotations

import torch

TINY = dict(embed_dim=24, depth=2, heads=2, dim_head=8, mlp_ratio=2, decoder_dim=16, decoder_depth=1,
            decoder_heads=2, decoder_dim_head=8, decoder_mlp_ratio=2)


def make_batch(manifest, b: int, seed: int = 0) -> dict:
    """Random batch following the contract (float inputs, sorted dates, targets with some missing values)."""
    g = torch.Generator().manual_seed(seed)
    batch = {"ref_date": torch.tensor([[[2019, 182, 0]]] * b, dtype=torch.int16)}
    for m in manifest.modalities.values():
        batch[m.name] = torch.rand((b, m.temporal_bins, m.channels, m.image_size, m.image_size), generator=g)
        doy = torch.sort(torch.randint(1, 366, (b, m.temporal_bins), generator=g), dim=1).values
        batch[f"{m.name}_dates"] = torch.stack([torch.full_like(doy, 2019), doy, torch.zeros_like(doy)], -1).short()
    for t in manifest.targets.values():
        if t.type == "multilabel":
            batch[t.name] = (torch.rand((b, t.num_classes), generator=g) > 0.5).float()
        else:
            y = torch.randint(0, t.num_classes, (b, t.image_size, t.image_size), generator=g)
            y[:, 0] = t.missing_value
            batch[t.name] = y
    return batch
