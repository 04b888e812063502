"""Reading images and writing label maps on the input's exact grid, atomically."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_geometry, write_dicom_series
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.io import (find_dicom_series, label_format, mask_to_sitk, read_image, read_label,
                                write_label)


@pytest.fixture()
def oblique_mask():
    geometry = oblique_geometry()
    rng = np.random.default_rng(1)
    return geometry, rng.random(geometry.shape) > 0.7


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_label_round_trip_keeps_geometry_and_voxels(tmp_path, oblique_mask, ext):
    geometry, mask = oblique_mask
    path = write_label(mask, geometry, tmp_path / f"out{ext}")
    back = read_label(path)
    assert back.geometry.same_grid(geometry), back.geometry.describe_difference(geometry)
    np.testing.assert_array_equal(back.array > 0, mask)
    assert set(np.unique(back.array)) <= {0, 1}
    assert [p.name for p in tmp_path.iterdir()] == [f"out{ext}"]  # no temporary left behind


@pytest.fixture()
def umask_022():
    """A known umask for permission checks (the process's is restored after)."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize("ext", [".nii.gz", ".seg.nrrd", ".png"])
def test_written_labels_get_ordinary_permissions(tmp_path, umask_022, ext):
    """Atomic writing must not leave outputs readable by their owner only (mkstemp's 0600)."""
    if ext == ".png":
        mask = np.zeros((1, 20, 30), bool)
        mask[0, 5:10, 3:25] = True
        geometry = read_image(_write_png(tmp_path / "in.png", (mask[0] * 200).astype(np.uint8))).geometry
    else:
        geometry = oblique_geometry()
        mask = np.zeros(geometry.shape, dtype=bool)
        mask[..., 2:5] = True
    path = write_label(mask, geometry, tmp_path / f"out{ext}", is_2d=ext == ".png")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_seg_nrrd_carries_segment_name(tmp_path, oblique_mask):
    import slicerio

    geometry, mask = oblique_mask
    path = write_label(mask, geometry, tmp_path / "out.seg.nrrd", segment_name="hippocampus")
    segmentation = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in segmentation["segments"]] == ["hippocampus"]
    np.testing.assert_allclose(segmentation["ijkToLPS"], geometry.ijk_to_lps(), atol=1e-6)


def test_failed_write_leaves_no_file(tmp_path, oblique_mask):
    geometry, mask = oblique_mask
    target = tmp_path / "out.nii.gz"
    with pytest.raises(ValueError, match="does not match"):
        write_label(mask[:-1], geometry, target)  # fails inside the writer, after the temp file exists
    assert list(tmp_path.iterdir()) == []


def test_existing_output_survives_failed_overwrite(tmp_path, oblique_mask):
    geometry, mask = oblique_mask
    target = write_label(mask, geometry, tmp_path / "out.nii.gz")
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_label(~mask[:-1], geometry, target)
    assert target.read_bytes() == before


def test_png_round_trip_2d(tmp_path):
    mask = np.zeros((1, 20, 30), bool)
    mask[0, 5:10, 3:25] = True
    image = read_image(_write_png(tmp_path / "in.png", (mask[0] * 200).astype(np.uint8)))
    assert image.is_2d and image.array.shape == (1, 20, 30)
    out = write_label(mask, image.geometry, tmp_path / "out.png", is_2d=True)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert back.shape == (20, 30) and back.max() == 1
    np.testing.assert_array_equal(back > 0, mask[0])


def test_rgb_png_becomes_grey(tmp_path):
    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[..., 1] = 100
    image = sitk.GetImageFromArray(rgb, isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb.png"))
    grey = read_image(tmp_path / "rgb.png")
    assert grey.array.shape == (1, 8, 9)
    np.testing.assert_allclose(grey.array, 58.7, atol=0.01)


def test_bad_inputs_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "corrupt.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(tmp_path / "four_d.nii.gz"))
    with pytest.raises(InputError, match="4D"):
        read_image(tmp_path / "four_d.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 2), str(tmp_path / "vector.nrrd"))
    with pytest.raises(InputError, match="components"):
        read_image(tmp_path / "vector.nrrd")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="no DICOM"):
        read_image(tmp_path / "empty_dir")
    with pytest.raises(InputError, match="unsupported output format"):
        label_format(tmp_path / "out.txt")


def test_dicom_series_is_ordered_by_position_not_file_name(tmp_path):
    geometry = oblique_geometry(size=(16, 12, 7), spacing=(0.8, 0.8, 2.0), left_handed=False)
    volume = np.arange(np.prod(geometry.shape), dtype=np.int16).reshape(geometry.shape)
    source = mask_to_sitk(np.zeros(geometry.shape), geometry)
    image = sitk.GetImageFromArray(volume)
    image.CopyInformation(source)
    write_dicom_series(image, tmp_path / "series", shuffle_names=True)
    read = read_image(tmp_path / "series")
    assert read.modality == "MR"
    np.testing.assert_array_equal(read.array, volume)
    assert read.geometry.same_grid(geometry, tolerance=1e-3), read.geometry.describe_difference(geometry)


def test_real_jpeg2000_ct_series(data_dir):
    folder = data_dir / "ct_dicom_totalsegmentator" / "example_ct_dicom"
    if not folder.is_dir():
        pytest.skip("example CT DICOM series absent")
    assert len(find_dicom_series(folder)) == 1
    image = read_image(folder)
    assert image.array.shape == (20, 512, 512)
    assert image.modality == "CT"
    np.testing.assert_allclose(image.geometry.spacing[:2], (0.977, 0.977), atol=1e-3)
    np.testing.assert_allclose(image.geometry.spacing[2], 2.0, atol=1e-3)
    assert -1100 < image.array.min() < -900 and image.array.max() > 500  # real HU values decoded
    z = [image.geometry.index_to_lps(np.array([0, 0, k]))[2] for k in range(20)]
    assert np.all(np.diff(z) * np.sign(z[-1] - z[0]) > 0)  # monotonic slice positions


def _write_png(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path
