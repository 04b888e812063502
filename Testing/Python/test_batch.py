"""Batch segmentation: mixed inputs, per-case prompts (voxel JSON and Slicer markups), resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import dice, ellipsoid_mask, oblique_geometry, write_dicom_series
from MedFMSegmentLib.batch import BatchSettings, discover_cases, load_prompts_file, prompts_from_markups, run_batch
from MedFMSegmentLib.cli import main
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.io import array_to_sitk, read_image, read_label


def _volume(geometry, seed):
    truth = ellipsoid_mask(geometry.shape, (geometry.shape[0] // 2, 24, 26), (2.5, 12, 14))
    rng = np.random.default_rng(seed)
    volume = (100 + 400 * truth + 15 * rng.standard_normal(geometry.shape)).astype(np.int16)
    image = array_to_sitk(volume, geometry)
    return image, truth


@pytest.fixture()
def mixed_folder(tmp_path):
    """NIfTI + DICOM series + a corrupt file, each with a one-slice box prompt (cheap on the CPU)."""
    folder = tmp_path / "study"
    folder.mkdir()
    geometry = oblique_geometry(size=(52, 48, 5), spacing=(0.9, 0.9, 2.0), left_handed=False)
    nifti, truth_a = _volume(geometry, 0)
    sitk.WriteImage(nifti, str(folder / "case_a.nii.gz"))
    dicom, truth_b = _volume(geometry, 1)
    write_dicom_series(dicom, folder / "series_b", shuffle_names=True)
    (folder / "broken.nii.gz").write_bytes(b"not an image at all")
    k = geometry.shape[0] // 2
    _, j, i = np.nonzero(truth_a[k:k + 1])
    box = [int(i.min()), int(j.min()), k, int(i.max()), int(j.max()), k]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"case_a.nii.gz": {"box": box}, "series_b": {"box": box},
                                   "broken.nii.gz": {"box": box}}))
    return folder, prompts, {"case_a": truth_a, "series_b": truth_b}, k


def test_discover_cases_names_files_and_series(mixed_folder):
    folder, _, _, _ = mixed_folder
    cases = discover_cases([folder / "case_a.nii.gz", folder / "series_b", folder / "broken.nii.gz"])
    assert [c.name for c in cases] == ["case_a", "series_b", "broken"]
    assert cases[1].dicom_files is not None and len(cases[1].dicom_files) == 5


def test_batch_mixed_inputs_summary_exit_code_and_resume(mixed_folder, tmp_path, capsys):
    folder, prompts, truths, k = mixed_folder
    out = tmp_path / "out"
    inputs = [str(folder / "case_a.nii.gz"), str(folder / "series_b"), str(folder / "broken.nii.gz")]
    code = main(["batch", *inputs, "-o", str(out), "--prompts", str(prompts), "--device", "cpu"])
    assert code == 1  # one case failed
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "cannot read" in rows[2]["error"]
    assert sorted(p.name for p in out.iterdir()) == [".case_a.nii.gz.medfmsegment.json",
                                                     ".series_b.nii.gz.medfmsegment.json",
                                                     "case_a.nii.gz", "series_b.nii.gz", "summary.csv"]
    for name, source in (("case_a", folder / "case_a.nii.gz"), ("series_b", folder / "series_b")):
        label, image = read_label(out / f"{name}.nii.gz"), read_image(source)
        assert label.geometry.same_grid(image.geometry, tolerance=1e-3), label.geometry.describe_difference(image.geometry)
        assert dice(label.array[k] > 0, truths[name][k]) > 0.85
        assert not np.delete(label.array, k, axis=0).any()
    assert "case 3/3 failed" in capsys.readouterr().out

    before = (out / "case_a.nii.gz").stat().st_mtime_ns
    (out / "series_b.nii.gz").write_bytes(b"truncated by a crash")  # an invalid output is redone
    results = run_batch(inputs[:2], out, BatchSettings(device="cpu", resume=True,
                                                       prompts=load_prompts_file(prompts)))
    assert [r.status for r in results] == ["skipped", "ok"]
    assert (out / "case_a.nii.gz").stat().st_mtime_ns == before
    assert read_label(out / "series_b.nii.gz").array.any()


def test_markups_prompts_in_ras_and_lps(tmp_path):
    geometry = oblique_geometry(size=(40, 30, 10), spacing=(0.8, 1.2, 2.0))
    corner_lo, corner_hi = np.array([5.0, 6.0, 2.0]), np.array([20.0, 18.0, 7.0])
    center_ijk = (corner_lo + corner_hi) / 2
    # A ROI aligned with the voxel axes, written in RAS as Slicer does.
    ras_axes = geometry.ijk_to_ras()[:3, :3] / np.array(geometry.spacing)
    size_mm = (corner_hi - corner_lo) * np.array(geometry.spacing)
    roi = {"type": "ROI", "coordinateSystem": "RAS", "center": list(geometry.index_to_ras(center_ijk)),
           "size": list(size_mm), "orientation": list(ras_axes.ravel())}
    click_ijk = np.array([12.0, 11.0, 4.0])
    points = {"type": "Fiducial", "name": "F", "coordinateSystem": "LPS",
              "controlPoints": [{"label": "F-1", "position": list(geometry.index_to_lps(click_ijk))}]}
    negatives = {"type": "Fiducial", "name": "negative", "coordinateSystem": "RAS",
                 "controlPoints": [{"label": "N", "position": list(geometry.index_to_ras(np.array([3.0, 3.0, 4.0])))}]}
    path = tmp_path / "prompts.mrk.json"
    path.write_text(json.dumps({"markups": [roi, points, negatives]}))
    prompts = prompts_from_markups([str(path)], geometry)
    assert prompts.box == (5, 6, 2, 20, 18, 7)
    assert prompts.positives == [tuple(click_ijk)]
    assert prompts.negatives == [(3.0, 3.0, 4.0)]


def test_batch_bad_arguments(tmp_path, capsys):
    with pytest.raises(InputError, match="needs --adapter"):
        run_batch([tmp_path], tmp_path / "out", BatchSettings())
    (tmp_path / "p.json").write_text("[1, 2]")
    assert main(["batch", str(tmp_path), "-o", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.json")]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err
