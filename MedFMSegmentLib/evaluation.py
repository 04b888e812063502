"""Mask evaluation: Dice and 95th-percentile Hausdorff distance (MONAI metrics, mm)."""
from __future__ import annotations

import math
import os

import numpy as np

from .errors import InputError

__all__ = ["evaluate_files", "evaluate_masks", "json_safe"]


def evaluate_masks(pred: np.ndarray, label: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Dice and HD95 (mm) of two boolean ``(K, J, I)`` masks; ``spacing`` is along (I, J, K)."""
    pred = np.asarray(pred).astype(bool)
    label = np.asarray(label).astype(bool)
    if pred.shape != label.shape:
        raise InputError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(label[None, None].astype(np.float32))
    n_pred, n_label = int(pred.sum()), int(label.sum())
    inter = int(np.logical_and(pred, label).sum())
    if n_pred + n_label == 0:
        dice = 1.0
    else:
        dice = float(DiceMetric(include_background=True, reduction="mean")(p, g).item())
    hd95 = None
    if n_pred and n_label:
        kji_spacing = tuple(float(s) for s in reversed(tuple(spacing)))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's deprecated always_return_as_numpy
            hd = HausdorffDistanceMetric(include_background=True, percentile=95)(p, g, spacing=kji_spacing)
        hd95 = float(hd.item())
    return {"dice": dice, "hd95": hd95, "prediction_voxels": n_pred, "label_voxels": n_label,
            "intersection_voxels": inter}


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
