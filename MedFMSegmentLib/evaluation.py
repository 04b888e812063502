"""``medfmsegment evaluate``: Dice and 95th-percentile Hausdorff distance (mm) of a prediction file
against a label file (the metrics of :mod:`.metrics`)."""
from __future__ import annotations

import json
import math

import numpy as np

from .errors import InputError
from .metrics import dice, hd95


def evaluate_masks(pred: np.ndarray, label: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Dice and HD95 (mm, None when a mask is empty) of two boolean ``(K, J, I)`` masks, with
    their voxel counts; ``spacing`` is along (I, J, K). The metrics are :mod:`.metrics`'."""
    pred, label = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
    return {"dice": dice(pred, label), "hd95": hd95(pred, label, spacing), "prediction_voxels": int(pred.sum()),
            "label_voxels": int(label.sum()), "intersection_voxels": int(np.logical_and(pred, label).sum())}


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
