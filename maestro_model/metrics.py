"""Evaluation metrics of MAESTRO (model-spec §7.6), accumulated as integer counts over a whole evaluation set.

Counts (not per-batch scores) are summed across ranks, so the result is the metric of the full set exactly once:
accumulators keep int64 tensors on the device; :func:`multilabel_scores` and :func:`segmentation_scores` turn the
summed counts into scores (pure numpy).
"""

from __future__ import annotations

import numpy as np
import torch

THRESHOLD = 0.5  # multilabel decision on the sigmoid


def _nan_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    out = np.full(np.broadcast(a, b).shape, np.nan)
    np.divide(a, b, out=out, where=b != 0)
    return out


def multilabel_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, float]:
    """Per-label F1 = 2TP/(2TP+FP+FN) (NaN when a label is absent and never predicted); weighted_f1 = support-weighted
    mean (support = TP+FN, NaN F1s ignored), average_f1 = mean of the defined F1s, overall_accuracy = correct label
    decisions / all label decisions."""
    f1 = _nan_div(2 * tp, 2 * tp + fp + fn)
    support = np.asarray(tp + fn, dtype=np.float64)
    weighted = _nan_div(np.nansum(f1 * support), support.sum())
    defined = f1[~np.isnan(f1)]
    total = np.asarray(tp + fp + fn + tn).sum()
    return {"weighted_f1": float(weighted), "average_f1": float(defined.mean()) if defined.size else float("nan"),
            "overall_accuracy": float(_nan_div((np.asarray(tp) + tn).sum(), total))}


def segmentation_scores(confusion: np.ndarray, ignore: tuple[int, ...] = ()) -> dict[str, float]:
    """From a K x K confusion matrix (rows = target, columns = prediction): IoU_k = TP/(TP+FP+FN); mIoU and mean F1
    over the classes present in the targets and not ignored; overall accuracy over all counted pixels. Predictions
    into an ignored or absent class still count as errors of the true class."""
    c = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(c)
    support, predicted = c.sum(axis=1), c.sum(axis=0)
    iou = _nan_div(tp, support + predicted - tp)
    f1 = _nan_div(2 * tp, support + predicted)
    present = support > 0
    present[[k for k in ignore if k < len(present)]] = False
    nan = float("nan")
    return {"miou": float(iou[present].mean()) if present.any() else nan,
            "mean_f1": float(f1[present].mean()) if present.any() else nan,
            "overall_accuracy": float(_nan_div(tp.sum(), c.sum())),
            "classes_present": int(present.sum())}


class MultilabelCounts:
    """Per-label TP/FP/FN/TN for sigmoid > 0.5; samples with any label equal to ``missing_value`` are skipped
    (as in the loss)."""

    def __init__(self, num_classes: int, missing_value: int = -1, device: torch.device | str = "cpu"):
        self.missing_value = missing_value
        self.counts = torch.zeros(4, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        keep = ~(target == self.missing_value).any(dim=1)
        pred = torch.sigmoid(logits[keep].float()) > THRESHOLD
        truth = target[keep] > 0.5
        self.counts += torch.stack([(pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0),
                                    (~pred & ~truth).sum(0)]).to(self.counts.device)

    def scores(self, counts: torch.Tensor | None = None) -> dict[str, float]:
        """Scores of ``counts`` (e.g. the sum over ranks) or of this accumulator."""
        tp, fp, fn, tn = (counts if counts is not None else self.counts).cpu().numpy()
        return multilabel_scores(tp, fp, fn, tn)


class SegmentationCounts:
    """K x K confusion matrix of argmax predictions; pixels whose target is ``missing_value`` or an ignored class
    are not counted."""

    def __init__(self, num_classes: int, missing_value: int, ignore: tuple[int, ...] = (),
                 device: torch.device | str = "cpu"):
        self.num_classes, self.missing_value, self.ignore = num_classes, missing_value, tuple(ignore)
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        k = self.num_classes
        pred = logits.argmax(dim=1).flatten()
        truth = target.long().flatten()
        keep = truth != self.missing_value
        for cls in self.ignore:
            keep &= truth != cls
        pred, truth = pred[keep], truth[keep]
        if truth.numel() and (truth.min() < 0 or truth.max() >= k):
            bad = truth[(truth < 0) | (truth >= k)].unique().tolist()
            raise ValueError(f"segmentation labels {bad} are outside 0..{k - 1} and neither ignored nor missing")
        self.counts += torch.bincount(truth * k + pred, minlength=k * k).reshape(k, k).to(self.counts.device)

    def scores(self, counts: torch.Tensor | None = None) -> dict[str, float]:
        return segmentation_scores((counts if counts is not None else self.counts).cpu().numpy(), self.ignore)
