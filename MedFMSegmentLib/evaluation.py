"""Mask evaluation: Dice and 95th-percentile Hausdorff distance (MONAI metrics, mm)."""
from __future__ import annotations

import json
import math

import numpy as np

from .errors import InputError


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


def _run(args) -> int:
    from .io import read_label

    pred = read_label(args.prediction)
    label = read_label(args.label)
    if not pred.geometry.same_grid(label.geometry):
        raise InputError("prediction and label grids differ: " + pred.geometry.describe_difference(label.geometry))
    if args.label_value is None:
        p, g = pred.array > 0, label.array > 0
    else:
        if not np.any(label.array == args.label_value):
            raise InputError(f"label value {args.label_value} does not occur in {args.label}")
        g = label.array == args.label_value
        p = (pred.array == args.label_value) if np.any(pred.array == args.label_value) else pred.array > 0
    print(json.dumps(json_safe(evaluate_masks(p, g, label.geometry.spacing)), allow_nan=False), flush=True)
    return 0


def json_safe(values: dict) -> dict:
    """``values`` with NaN and infinite floats replaced by None (JSON null): NaN is not JSON."""
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in values.items()}


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="Dice and HD95 of a prediction against a label")
    parser.add_argument("--prediction", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--label-value", type=int, default=None)
    parser.set_defaults(handler=_run)
