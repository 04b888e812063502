"""Evaluation: Dice and HD95 on masks with hand-computed values; CLI mismatch errors."""
import subprocess
import sys

import numpy as np
import pytest

from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.evaluation import evaluate_masks
from MedFMSegmentLib.io import MedicalImage, write_label


def test_dice_by_hand():
    pred = np.zeros((1, 10, 10), bool)
    label = np.zeros((1, 10, 10), bool)
    pred[0, 0:4, 0:4] = True  # 16 voxels
    label[0, 2:6, 0:4] = True  # 16 voxels, 8 shared
    result = evaluate_masks(pred, label, (1.0, 1.0, 1.0))
    assert result["dice"] == pytest.approx(2 * 8 / 32)
    assert result["prediction_voxels"] == 16 and result["label_voxels"] == 16
    assert result["intersection_voxels"] == 8
    assert result["hd95"] == pytest.approx(2.0)


def test_hd95_uses_spacing():
    pred = np.zeros((1, 10, 10), bool)
    label = np.zeros((1, 10, 10), bool)
    pred[0, 2:4, 0:4] = True
    label[0, 2:4, 1:5] = True  # shifted one voxel along I (columns)
    assert evaluate_masks(pred, label, (0.5, 1.0, 1.0))["hd95"] == pytest.approx(0.5)
    assert evaluate_masks(pred, label, (2.0, 1.0, 1.0))["hd95"] == pytest.approx(2.0)


def test_identical_and_mismatch():
    mask = np.zeros((3, 5, 5), bool)
    mask[1, 1:3, 1:3] = True
    assert evaluate_masks(mask, mask)["dice"] == 1.0
    with pytest.raises(InputError):
        evaluate_masks(mask, mask[:2])


def test_cli(tmp_path):
    a = np.zeros((4, 8, 8), np.uint8)
    a[1:3, 2:6, 2:6] = 1
    b = np.zeros((4, 8, 8), np.uint8)
    b[1:3, 2:6, 2:4] = 1
    write_label(a, MedicalImage.from_array(a).geometry, tmp_path / "a.nii.gz")
    write_label(b, MedicalImage.from_array(b).geometry, tmp_path / "b.nii.gz")
    out = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "evaluate", "--prediction",
                          str(tmp_path / "b.nii.gz"), "--label", str(tmp_path / "a.nii.gz")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads(out.stdout)
    assert result["dice"] == pytest.approx(2 * 16 / (32 + 16))
    c = np.zeros((4, 8, 9), np.uint8)
    write_label(c, MedicalImage.from_array(c).geometry, tmp_path / "c.nii.gz")
    out = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "evaluate", "--prediction",
                          str(tmp_path / "c.nii.gz"), "--label", str(tmp_path / "a.nii.gz")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_metrics_module_matches_the_hand_computed_values():
    from MedFMSegmentLib.metrics import MaskMetrics, dice, hd95

    pred = np.zeros((1, 10, 10), bool)
    label = np.zeros((1, 10, 10), bool)
    pred[0, 0:4, 0:4] = True
    label[0, 2:6, 0:4] = True
    assert dice(pred, label) == pytest.approx(0.5)
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert hd95(pred, label, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(pred, np.zeros_like(label)) is None
    shifted_pred, shifted_label = np.zeros((1, 10, 10), bool), np.zeros((1, 10, 10), bool)
    shifted_pred[0, 2:4, 0:4] = True
    shifted_label[0, 2:4, 1:5] = True  # one voxel along I: the first spacing value
    assert hd95(shifted_pred, shifted_label, (0.5, 1.0, 1.0)) == pytest.approx(0.5)
    metrics = MaskMetrics(hd95=True)
    assert metrics(pred, label, (1.0, 1.0, 1.0)) == {"dice": pytest.approx(0.5), "hd95": pytest.approx(2.0)}
    metrics(pred, pred)
    assert metrics.aggregate() == {"cases": 2, "dice": pytest.approx(0.75), "hd95": pytest.approx(1.0)}
    with pytest.raises(InputError):
        dice(pred, label[:, :5])
    evaluated = evaluate_masks(pred, label, (1.0, 1.0, 1.0))
    assert (evaluated["dice"], evaluated["hd95"]) == (pytest.approx(dice(pred, label)), pytest.approx(hd95(pred, label)))
