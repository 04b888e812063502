"""``medfmsegment evaluate``: Dice and 95th-percentile Hausdorff distance (mm) of a prediction file
against a label file (the metrics of :mod:`.metrics`)."""
from __future__ import annotations

import math
import os

import numpy as np

from .errors import InputError
from .metrics import dice, hd95

__all__ = ["evaluate_files", "evaluate_masks", "json_safe"]


def evaluate_masks(pred: np.ndarray, label: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Dice and HD95 (mm, None when a mask is empty) of two boolean ``(K, J, I)`` masks, with
    their voxel counts; ``spacing`` is along (I, J, K). The metrics are :mod:`.metrics`'."""
    pred, label = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
    return {"dice": dice(pred, label), "hd95": hd95(pred, label, spacing), "prediction_voxels": int(pred.sum()),
            "label_voxels": int(label.sum()), "intersection_voxels": int(np.logical_and(pred, label).sum())}


def evaluate_files(prediction: str | os.PathLike, label: str | os.PathLike, label_value: int | None = None) -> dict:
    """:func:`evaluate_masks` of two label files on one grid, JSON-ready (NaN as None).

    With ``label_value`` the label's voxels of that value are the truth, and the prediction's
    voxels of that value (else all its non-zero voxels) the prediction; without it, non-zero voxels.
    """
    from .io import read_label

    pred = read_label(prediction)
    truth = read_label(label)
    if not pred.geometry.same_grid(truth.geometry):
        raise InputError("prediction and label grids differ: " + pred.geometry.describe_difference(truth.geometry))
    if label_value is None:
        p, g = pred.array > 0, truth.array > 0
    else:
        if not np.any(truth.array == label_value):
            raise InputError(f"label value {label_value} does not occur in {label}")
        g = truth.array == label_value
        p = (pred.array == label_value) if np.any(pred.array == label_value) else pred.array > 0
    return json_safe(evaluate_masks(p, g, truth.geometry.spacing))


def json_safe(values: dict) -> dict:
    """``values`` with NaN and infinite floats replaced by None (JSON null): NaN is not JSON."""
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in values.items()}
