"""The medfmsegment command end to end: outputs on the input's grid, bad input -> exit 2, one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import dice, ellipsoid_mask, oblique_geometry
from MedFMSegmentLib.cli import main
from MedFMSegmentLib.io import array_to_sitk, read_label


@pytest.fixture(scope="module")
def oblique_volume(tmp_path_factory):
    """A bright ellipsoid in an oblique, anisotropic, left-handed volume on disk."""
    geometry = oblique_geometry(size=(64, 56, 9), spacing=(0.8, 0.8, 2.0), left_handed=True)
    truth = ellipsoid_mask(geometry.shape, (4, 28, 32), (3.2, 14, 18))
    rng = np.random.default_rng(0)
    volume = (80 + 400 * truth + 15 * rng.standard_normal(geometry.shape)).astype(np.float32)
    image = array_to_sitk(volume, geometry)
    path = tmp_path_factory.mktemp("data") / "oblique.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, geometry, truth


def test_segment_3d_box_output_lines_up_with_input(oblique_volume, tmp_path, capsys):
    """Slice-by-slice propagation (the default for this box, ``auto``, is consensus: tested below)."""
    path, geometry, truth = oblique_volume
    k, j, i = np.nonzero(truth)
    out = tmp_path / "seg.nrrd"
    code = main(["segment", str(path), "-o", str(out), "--device", "cpu", "--box3d-strategy", "propagate",
                 "--box", str(i.min()), str(j.min()), str(k.min()), str(i.max()), str(j.max()), str(k.max())])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    result = read_label(out)
    assert result.geometry.same_grid(geometry), result.geometry.describe_difference(geometry)
    assert set(np.unique(result.array)) == {0, 1}
    assert dice(result.array > 0, truth) > 0.8


def test_segment_3d_box_consensus_strategy(oblique_volume, tmp_path, capsys):
    """``--box3d-strategy consensus`` on the oblique, left-handed volume: a correct label map."""
    path, geometry, truth = oblique_volume
    k, j, i = np.nonzero(truth)
    out = tmp_path / "seg.nii.gz"
    code = main(["segment", str(path), "-o", str(out), "--device", "cpu", "--box3d-strategy", "consensus",
                 "--box", str(i.min()), str(j.min()), str(k.min()), str(i.max()), str(j.max()), str(k.max())])
    assert code == 0, capsys.readouterr().err
    result = read_label(out)
    assert result.geometry.same_grid(geometry)
    assert dice(result.array > 0, truth) > 0.8


def test_segment_click_on_2d_png_writes_png(data_dir, tmp_path):
    image = data_dir / "hc18_fetal_head_us" / "images" / "010_HC.png"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hc18_fetal_head_us" / "masks" / "010_HC_mask.png")))
    rows, cols = np.nonzero(truth)
    out = tmp_path / "mask.png"
    assert main(["segment", str(image), "-o", str(out), "--device", "cpu",
                 "--point", str(int(cols.mean())), str(int(rows.mean())), "0"]) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert mask.shape == truth.shape and mask.max() == 1
    assert dice(mask > 0, truth > 0) > 0.75


def test_precision_option_reaches_the_model(data_dir, tmp_path, capsys):
    """``--precision f32`` gives exactly the float32 OpenVINO (or PyTorch) mask of the API."""
    from MedFMSegmentLib.api import segment_file
    from MedFMSegmentLib.prompts import Prompts

    image = data_dir / "hc18_fetal_head_us" / "images" / "010_HC.png"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hc18_fetal_head_us" / "masks" / "010_HC_mask.png")))
    rows, cols = np.nonzero(truth)
    box = [str(v) for v in (cols.min(), rows.min(), 0, cols.max(), rows.max(), 0)]
    out = tmp_path / "f32.png"
    assert main(["segment", str(image), "-o", str(out), "--device", "cpu", "--precision", "f32", "--box", *box]) == 0
    expected = segment_file(image, tmp_path / "api.png", Prompts(box=tuple(int(v) for v in box)), device="cpu",
                            precision="f32")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0, expected.mask[0])
    assert dice(expected.mask[0], truth > 0) > 0.85
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(image), "-o", str(tmp_path / "x.png"), "--precision", "fp8", "--box", *box])
    assert exit_info.value.code == 2 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--box", "0", "0", "0", "200", "10", "5"], "outside the image"),
    (["--box", "10", "0", "0", "5", "10", "5"], "inverted box"),
    (["--point", "1", "1", "99"], "outside the image"),
    ([], "at least one prompt"),
    (["--box", "0", "0", "0", "5", "5", "5", "--model", "sam_vit_b"], "needs --checkpoint"),
    (["--box", "0", "0", "0", "5", "5", "5", "--model", "sam_vit_b", "--checkpoint", "missing.pth"], "not found"),
])
def test_bad_prompts_and_models_exit_2_with_one_line(oblique_volume, tmp_path, capsys, args, message):
    path, _, _ = oblique_volume
    out = tmp_path / "out.nii.gz"
    assert main(["segment", str(path), "-o", str(out), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_bad_files_exit_2(oblique_volume, tmp_path, capsys):
    path, _, _ = oblique_volume
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x00garbage")
    four_d = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkFloat32), str(four_d))
    cases = [
        ([str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "a.nii.gz")], "input not found"),
        ([str(corrupt), "-o", str(tmp_path / "b.nii.gz")], "cannot read"),
        ([str(four_d), "-o", str(tmp_path / "c.nii.gz")], "4D"),
        ([str(path), "-o", str(tmp_path / "d.txt")], "unsupported output format"),
        ([str(path), "-o", str(tmp_path / "no_such_dir" / "e.nii.gz")], "output folder does not exist"),
        ([str(path), "-o", str(tmp_path / "f.png")], "PNG output needs a 2D image"),
    ]
    for args, message in cases:
        assert main(["segment", *args, "--box", "0", "0", "0", "1", "1", "0", "--device", "cpu"]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.nii.gz", "four_d.nii.gz"]


def test_installed_command_info_and_error_exit_code(tmp_path):
    """The console script as a user runs it: a separate process, JSON info, exit 2 on bad input."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    info = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "info"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["device"] in ("cpu", "cuda", "mps")
    assert {m["name"] for m in data["models"]} >= {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"}
    bad = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "segment", str(tmp_path / "nope.nii.gz"),
                          "-o", str(tmp_path / "x.nii.gz"), "--box", "0", "0", "0", "1", "1", "0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def test_demo_segments_generated_volume(tmp_path, capsys):
    """The README's first command: a generated volume segmented on the embedded model."""
    assert main(["demo", "-o", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.split("\nsegmentation written")[0])
    assert report["dice_vs_truth"] > 0.9
    result = read_label(report["segmentation"])
    image = sitk.ReadImage(report["image"])
    assert result.array.shape == sitk.GetArrayFromImage(image).shape
