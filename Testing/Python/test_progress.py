"""Command-line progress: plain lines the Slicer module parses when not on a terminal, tqdm bars on one;
and the demo, which shows it."""

from __future__ import annotations

import io
import json

import numpy as np
import SimpleITK as sitk

from MedFMSegmentLib.batch import CaseResult
from MedFMSegmentLib.io import read_label
from MedFMSegmentLib.progress import batch_progress, finetune_progress, interactive, slice_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _reports():
    yield {"stage": "embedding", "done": 10, "total": 12}
    yield {"stage": "embedding", "done": 11, "total": 12}
    yield {"stage": "embedding", "done": 12, "total": 12}
    yield {"step": 1, "steps": 4, "loss": 0.5, "val_dice": None}
    yield {"step": 2, "steps": 4, "loss": 0.25, "val_dice": 0.7}
    for done in (0, 1, 30, 31, 40):  # the U-Net candidate's seconds (automatic mode for volumes)
        yield {"stage": "automatic_net", "done": done, "total": 40}


def test_finetune_plain_lines_are_the_ones_slicer_parses(monkeypatch):
    monkeypatch.delenv("MEDFMSEGMENT_PROGRESS", raising=False)
    out = io.StringIO()
    with finetune_progress(stream=out) as progress:
        for report in _reports():
            progress(report)
    assert out.getvalue().splitlines() == ["embedding training slices 10/12", "embedding training slices 12/12",
                                           "step 1/4 loss 0.5000", "step 2/4 loss 0.2500 val_dice 0.700",
                                           "training the U-Net for automatic mode 0/40 s",
                                           "training the U-Net for automatic mode 30/40 s",
                                           "training the U-Net for automatic mode 40/40 s"]


def test_finetune_bar_shows_loss_and_validation_dice():
    out = io.StringIO()
    with finetune_progress(stream=out, bar=True) as progress:
        for report in _reports():
            progress(report)
    text = out.getvalue()
    assert "training" in text and "2/4" in text and "loss=0.2500" in text and "val_dice=0.700" in text
    assert "embedding" in text and "12/12" in text
    assert "step 1/4" not in text  # no plain lines beside the bar


def test_batch_plain_lines_and_bar(monkeypatch):
    monkeypatch.delenv("MEDFMSEGMENT_PROGRESS", raising=False)
    ok = CaseResult("in/a.nii.gz", "out/a.nii.gz", "ok", 1.25, 321)
    bad = CaseResult("in/b.nii.gz", "out/b.nii.gz", "failed", 0.5, 0, "cannot read in/b.nii.gz")
    plain = io.StringIO()
    progress = batch_progress(stream=plain)
    progress(1, 2, ok)
    progress(2, 2, bad)
    assert plain.getvalue().splitlines() == ["case 1/2 ok a.nii.gz 1.2 s 321 voxels",
                                             "case 2/2 failed b.nii.gz 0.5 s cannot read in/b.nii.gz"]
    terminal = _Terminal()
    with batch_progress(stream=terminal) as progress:
        progress(1, 2, ok)
        progress(2, 2, bad)
    text = terminal.getvalue()
    assert "2/2" in text and "case 2/2 failed b.nii.gz" in text and "case 1/2 ok" not in text


def test_slice_progress_is_silent_off_a_terminal_and_a_bar_on_one(monkeypatch):
    monkeypatch.delenv("MEDFMSEGMENT_PROGRESS", raising=False)
    plain = io.StringIO()
    with slice_progress(stream=plain) as progress:
        for done in range(1, 8):
            progress(done, 7)
    assert plain.getvalue() == ""
    terminal = _Terminal()
    with slice_progress(stream=terminal) as progress:
        for done in range(1, 8):
            progress(done, 7)
    assert "7/7" in terminal.getvalue() and "slice" in terminal.getvalue()


def test_environment_chooses_plain_or_bar(monkeypatch):
    monkeypatch.setenv("MEDFMSEGMENT_PROGRESS", "plain")
    assert not interactive(_Terminal())
    monkeypatch.setenv("MEDFMSEGMENT_PROGRESS", "bar")
    assert interactive(io.StringIO())
    monkeypatch.setenv("MEDFMSEGMENT_PROGRESS", "auto")
    assert interactive(_Terminal()) and not interactive(io.StringIO())


def test_demo_writes_segmentation_and_picture(tmp_path, capsys, monkeypatch):
    """``medfmsegment demo`` on the embedded model: the default path on a generated CT-like volume."""
    from MedFMSegmentLib.cli import main

    monkeypatch.delenv("MEDFMSEGMENT_PROGRESS", raising=False)
    assert main(["demo", "-o", str(tmp_path), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.split("\nsegmentation written")[0])
    assert report["dice_vs_truth"] > 0.95
    label = read_label(report["segmentation"])
    image = sitk.ReadImage(report["image"])
    assert label.array.shape == sitk.GetArrayFromImage(image).shape
    picture = sitk.GetArrayFromImage(sitk.ReadImage(report["picture"]))
    assert picture.shape[2] == 3 and picture.shape[:2] == tuple(3 * n for n in label.array.shape[1:])
    red = (picture[..., 0] == 255) & (picture[..., 1] == 40)
    assert red.sum() > 100  # the contour is drawn
    middle = (report["box"][2] + report["box"][5]) // 2
    assert np.array_equal(red.reshape(label.array.shape[1], 3, -1, 3).any(axis=(1, 3)) & ~label.array[middle].astype(bool),
                          np.zeros_like(label.array[middle], bool))  # only on the result's own pixels
