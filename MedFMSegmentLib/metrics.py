"""Mask metrics: Dice and the 95th-percentile Hausdorff distance, one implementation of each.

As in MONAI, each metric is a function (one pair of masks) and :class:`MaskMetrics` is the
accumulating form (one case at a time, then :meth:`MaskMetrics.aggregate`). Masks are bool
arrays of one shape, ``(K, J, I)`` for volumes; spacing is along ``(I, J, K)`` in mm.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from .errors import InputError
from .geometry import array_order

__all__ = ["MaskMetrics", "dice", "hd95"]


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred).astype(bool, copy=False), np.asarray(truth).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise InputError(f"prediction shape {pred.shape} differs from label shape {truth.shape}")
    return pred, truth


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap ``2 |P & T| / (|P| + |T|)``; 1.0 when both masks are empty."""
    pred, truth = _pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, truth).sum() / total)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float | None:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI's), None when a mask is empty.

    Args:
        pred, truth: Bool masks of one shape (``(K, J, I)`` for a volume).
        spacing: Voxel size along ``(I, J, K)`` (the reverse of the array axes); None: 1 mm.
    """
    pred, truth = _pair(pred, truth)
    if not pred.any() or not truth.any():
        return None
    import torch
    from monai.metrics import HausdorffDistanceMetric

    array_spacing = None if spacing is None else tuple(float(s) for s in array_order(spacing))[-pred.ndim:]
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    t = torch.from_numpy(truth[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's deprecated always_return_as_numpy
        value = HausdorffDistanceMetric(include_background=True, percentile=95)(p, t, spacing=array_spacing)
    return float(value.item())


class MaskMetrics:
    """Dice (and optionally HD95) accumulated over cases.

    Example:
        >>> metrics = MaskMetrics(hd95=True)
        >>> metrics(pred, truth, spacing)      # returns this case's {"dice": ..., "hd95": ...}
        >>> metrics.aggregate()                # {"dice": mean, "hd95": mean over defined values, "cases": n}
    """

    def __init__(self, hd95: bool = False) -> None:
        self.with_hd95 = hd95
        self.dice: list[float] = []
        self.hd95: list[float | None] = []

    def __call__(self, pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> dict:
        case = {"dice": dice(pred, truth)}
        self.dice.append(case["dice"])
        if self.with_hd95:
            case["hd95"] = hd95(pred, truth, spacing)
            self.hd95.append(case["hd95"])
        return case

    def aggregate(self) -> dict:
        """Means over the cases so far (HD95 over the cases where it is defined)."""
        result: dict = {"cases": len(self.dice), "dice": float(np.mean(self.dice)) if self.dice else None}
        if self.with_hd95:
            defined = [v for v in self.hd95 if v is not None]
            result["hd95"] = float(np.mean(defined)) if defined else None
        return result

    def reset(self) -> None:
        self.dice.clear()
        self.hd95.clear()
