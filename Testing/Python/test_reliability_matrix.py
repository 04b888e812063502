"""The reliability matrix: every bad input of issue 24 and every case that already held, as tests.

Each row runs ``medfmsegment`` in-process (or a library call) on inputs built in its own folder
and asserts the exit code, exactly one stderr line for a refusal (no traceback), that every
input is unchanged (SHA-256) and that nothing but the expected outputs is left behind. Rows that
must run a model use the real LiteMedSAM on a one-slice box (``--backend torch``), or the tiny
random network for library-level resume plumbing.
"""

from __future__ import annotations

import csv
import json
import os
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from MedFMSegmentLib.cli import main
from reliability_support import ROWS, Expect, row, snapshot

# Rows live in two modules so that neither grows past a readable size.
import reliability_rows_inputs  # noqa: F401,E402  (registers rows)
import reliability_rows_outputs  # noqa: F401,E402  (registers rows)


def _run(expect: Expect) -> int:
    if expect.call is not None:
        return expect.call()
    try:
        return main(expect.argv)
    except SystemExit as exc:  # argparse
        return int(exc.code)


@pytest.mark.parametrize("case", ROWS, ids=[r.id for r in ROWS])
def test_matrix(case, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expect = case.build(tmp_path)
    before = snapshot(tmp_path)
    code = _run(expect)
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    expected = expect.code if isinstance(expect.code, tuple) else (expect.code,)
    assert code in expected, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    if code in (1, 2) and expect.code != 1:  # a refusal
        assert len(lines) == 1, lines
        assert expect.message in lines[0], lines
    else:
        assert lines == [], lines
        assert expect.message in out, out
    after = snapshot(tmp_path)
    for path, digest in before.items():
        if path not in expect.changes:
            assert after.get(path) == digest, f"{path} was changed or removed"
    assert set(after) - set(before) == expect.creates
    if expect.check is not None:
        expect.check(tmp_path, out)


def test_every_defect_has_a_row():
    """Defects 1-7, 9-12 of issue 24 (8 is fine-tuning's) each have at least one row."""
    defects = {r.defect for r in ROWS}
    assert {"1", "2", "3", "4", "5", "6", "7", "9", "10", "11", "12", "holds"} <= defects


def test_concurrent_label_writers_leave_one_valid_file(tmp_path):
    """Eight threads writing one label path: the file is one writer's whole mask, no temporaries."""
    from MedFMSegmentLib.io import MedicalImage, read_label, write_label

    image = MedicalImage.from_array(np.zeros((3, 40, 48), np.float32))
    masks = [np.random.default_rng(n).random(image.geometry.shape) > 0.5 for n in range(8)]
    target = tmp_path / "out.nii.gz"
    threads = [threading.Thread(target=write_label, args=(m, image.geometry, target)) for m in masks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    back = read_label(target).array > 0
    assert any(np.array_equal(back, m) for m in masks)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_concurrent_summaries_never_share_a_temporary(tmp_path):
    """Two batch runs rewriting one summary.csv: each write is whole (unique temporaries)."""
    from MedFMSegmentLib.batch import CaseResult, write_summary

    results = [[CaseResult(f"in{n}_{k}", f"out{n}_{k}", "ok") for k in range(50)] for n in range(2)]
    errors: list[BaseException] = []

    def writer(rows):
        try:
            for _ in range(40):
                write_summary(rows, tmp_path / "summary.csv")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(r,)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 50 and len({r["input"].split("_")[0] for r in rows}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_evaluate_never_prints_nan(tmp_path, capfd):
    """``evaluate`` output is strict JSON: a missing HD95 is null, NaN never appears."""
    from MedFMSegmentLib.evaluation import json_safe
    from MedFMSegmentLib.io import MedicalImage, write_label

    label = np.zeros((3, 10, 10), np.uint8)
    label[1, 2:5, 2:5] = 1
    geometry = MedicalImage.from_array(label).geometry
    write_label(label, geometry, tmp_path / "label.nii.gz")
    write_label(np.zeros_like(label), geometry, tmp_path / "empty.nii.gz")
    assert main(["evaluate", "--prediction", str(tmp_path / "empty.nii.gz"), "--label",
                 str(tmp_path / "label.nii.gz")]) == 0
    out = capfd.readouterr().out
    result = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in evaluate output"))
    assert result["hd95"] is None and result["dice"] == 0.0
    assert json_safe({"hd95": float("nan"), "x": float("inf"), "dice": 0.5}) == {"hd95": None, "x": None, "dice": 0.5}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_the_model(tmp_path, capfd):
    from reliability_support import BOX, write_volume

    image = write_volume(tmp_path / "in.nii.gz")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = main(["segment", str(image), "-o", str(locked / "out.nii.gz"), "--model", "sam_vit_b",
                     "--box", *map(str, BOX)])
    finally:
        locked.chmod(0o755)
    assert code == 2 and "cannot write in output folder" in capfd.readouterr().err
    assert list(locked.iterdir()) == []


def test_written_label_geometry_equals_the_image_exactly(tmp_path):
    """An oblique, left-handed, anisotropic image: the label's grid is the image's, per format."""
    from conftest import oblique_geometry
    from MedFMSegmentLib.io import read_image, read_label, write_label

    geometry = oblique_geometry()
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".seg.nrrd"):
        image = sitk.GetImageFromArray(np.zeros(geometry.shape, np.float32))
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        image.SetDirection(tuple(geometry.direction.ravel()))
        sitk.WriteImage(image, str(tmp_path / f"image{ext.replace('.seg', '')}"))
        read = read_image(tmp_path / f"image{ext.replace('.seg', '')}")
        out = write_label(np.ones(geometry.shape, bool), read.geometry, tmp_path / f"label{ext}")
        back = read_label(out).geometry
        assert back.size == read.geometry.size
        np.testing.assert_allclose(back.direction, read.geometry.direction, atol=1e-6)
        np.testing.assert_allclose(back.spacing, read.geometry.spacing, rtol=1e-6)
        np.testing.assert_allclose(back.origin, read.geometry.origin, atol=1e-5)


@pytest.mark.parametrize("row_id", ["segment_output_is_input", "truncated_nii_gz", "dicom_missing_slice"])
def test_refusals_in_a_real_process(row_id, tmp_path):
    """The installed command in its own process: exit 2, one stderr line (ITK's C++ warnings too)."""
    import subprocess
    import sys

    expect = next(r for r in ROWS if r.id == row_id).build(tmp_path)
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", *expect.argv], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and expect.message in lines[0], done.stderr
    assert snapshot(tmp_path) == before
