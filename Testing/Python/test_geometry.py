"""The one geometry convention: checked against SimpleITK on oblique, anisotropic, left-handed grids."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_geometry
from MedFMSegmentLib.geometry import (VolumeGeometry, array_order, in_plane_axes, ras_to_lps, slice_from_volume,
                                      slice_into_volume, to_slice_coords, voxel_order)
from MedFMSegmentLib.io import mask_to_sitk


@pytest.mark.parametrize("left_handed", [False, True])
def test_index_to_lps_matches_simpleitk(left_handed):
    geometry = oblique_geometry(left_handed=left_handed)
    image = mask_to_sitk(np.zeros(geometry.shape, np.uint8), geometry)
    for ijk in [(0, 0, 0), (3, 7, 11), (19, 23, 15), (4.5, 2.25, 8.75)]:
        expected = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])
        np.testing.assert_allclose(geometry.index_to_lps(np.array(ijk)), expected, atol=1e-9)
    assert geometry.is_left_handed == left_handed


def test_ras_and_lps_round_trip_and_differ_by_flip():
    geometry = oblique_geometry()
    ijk = np.array([[1.0, 2.0, 3.0], [10.0, 0.0, 15.0]])
    ras = geometry.index_to_ras(ijk)
    np.testing.assert_allclose(ras, ras_to_lps(geometry.index_to_lps(ijk)))
    np.testing.assert_allclose(geometry.ras_to_index(ras), ijk, atol=1e-9)
    np.testing.assert_allclose(geometry.lps_to_index(geometry.index_to_lps(ijk)), ijk, atol=1e-9)


def test_from_ijk_to_ras_recovers_grid():
    geometry = oblique_geometry(spacing=(0.4, 1.3, 3.0))
    rebuilt = VolumeGeometry.from_ijk_to_ras(geometry.ijk_to_ras(), geometry.size)
    assert rebuilt.same_grid(geometry)
    np.testing.assert_allclose(rebuilt.spacing, (0.4, 1.3, 3.0))
    assert rebuilt.is_left_handed


def test_from_sitk_reads_2d_as_one_slice_volume():
    image = sitk.Image(30, 20, sitk.sitkUInt8)
    image.SetSpacing((0.2, 0.3))
    image.SetOrigin((5.0, -2.0))
    geometry = VolumeGeometry.from_sitk(image)
    assert geometry.size == (30, 20, 1)
    assert geometry.shape == (1, 20, 30)
    np.testing.assert_allclose(geometry.index_to_lps(np.array([2, 3, 0])), (5.4, -1.1, 0.0))


def test_voxel_axis_for_oblique_and_permuted_volumes():
    # A volume stored sagittally: voxel I runs A->P, J runs S->I, K runs L->R.
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)
    geometry = VolumeGeometry((10, 10, 10), (1, 1, 1), (0, 0, 0), direction)
    assert geometry.voxel_axis_for("sagittal") == 2
    assert geometry.voxel_axis_for("axial") == 1
    assert geometry.voxel_axis_for("coronal") == 0
    tilted = oblique_geometry()  # K mostly along S despite the tilt
    assert tilted.voxel_axis_for("axial") == 2
    with pytest.raises(ValueError):
        tilted.voxel_axis_for("oblique")


def test_slices_have_documented_layout():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (K, J, I)
    assert slice_from_volume(volume, 2, 1).shape == (5, 6)  # rows J, cols I
    assert slice_from_volume(volume, 1, 2).shape == (4, 6)  # rows K, cols I
    assert slice_from_volume(volume, 0, 3).shape == (4, 5)  # rows K, cols J
    i, j, k = 3, 2, 1
    for axis in (0, 1, 2):
        col, row, index = to_slice_coords((i, j, k), axis)
        assert slice_from_volume(volume, axis, index)[row, col] == volume[k, j, i]
        assert in_plane_axes(axis)[0] != axis
    target = np.zeros_like(volume)
    slice_into_volume(target, 1, 2, np.ones((4, 6)))
    assert target[:, 2, :].all() and target.sum() == 24


def test_same_grid_detects_differences():
    geometry = oblique_geometry()
    other = VolumeGeometry(geometry.size, geometry.spacing, (0, 0, 0), geometry.direction)
    assert not geometry.same_grid(other)
    assert "origin" in geometry.describe_difference(other)
    assert geometry.describe_difference(geometry) == ""


def _plane(normal, centre) -> np.ndarray:
    """A SliceToRAS-like 4x4: any in-plane axes, ``normal`` in column 2, ``centre`` in column 3."""
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    helper = np.array([1.0, 0, 0]) if abs(normal[0]) < 0.9 else np.array([0, 1.0, 0])
    x = np.cross(helper, normal)
    x /= np.linalg.norm(x)
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = x, np.cross(normal, x), normal, centre
    return matrix


@pytest.mark.parametrize("left_handed", [True, False])
def test_plane_to_voxel_slice_on_an_oblique_anisotropic_grid(left_handed):
    from MedFMSegmentLib.geometry import plane_to_voxel_slice

    geometry = oblique_geometry(size=(20, 24, 16), spacing=(0.7, 0.9, 2.5), left_handed=left_handed)
    ijk_to_ras = geometry.ijk_to_ras()
    inverse = np.linalg.inv(ijk_to_ras)
    for axis, index in ((2, 6), (0, 13), (1, 0), (1, 23)):
        normal = inverse[axis, :3]  # the normal of the voxel planes of this axis, in RAS
        centre_ijk = np.array([9.6, 11.2, 7.4])
        centre_ijk[axis] = index + 0.3  # off the voxel centre: the nearest slice is still index
        plane = _plane(normal if axis != 1 else -normal, geometry.index_to_ras(centre_ijk))
        assert plane_to_voxel_slice(ijk_to_ras, geometry.size, plane) == (axis, index)
    # Outside the volume along the axis, or tilted 30 degrees from every voxel plane: no slice.
    outside = np.array([9.0, 11.0, 16.6])
    assert plane_to_voxel_slice(ijk_to_ras, geometry.size, _plane(inverse[2, :3], geometry.index_to_ras(outside))) is None
    tilted = inverse[2, :3] / np.linalg.norm(inverse[2, :3]) + np.tan(np.radians(30)) * (
        inverse[0, :3] / np.linalg.norm(inverse[0, :3]))
    centre = geometry.index_to_ras(np.array([9.0, 11.0, 7.0]))
    assert plane_to_voxel_slice(ijk_to_ras, geometry.size, _plane(tilted, centre)) is None


def test_array_and_voxel_order_match_simpleitk():
    image = sitk.Image([5, 3, 2], sitk.sitkUInt8)  # size (I, J, K)
    image.SetSpacing((0.5, 1.5, 3.0))
    array = sitk.GetArrayFromImage(image)
    assert voxel_order(array.shape) == image.GetSize()
    assert array_order(image.GetSize()) == array.shape
    assert array_order(image.GetSpacing()) == (3.0, 1.5, 0.5)
    assert array_order((0.5, 1.5)) == (1.5, 0.5)
    assert VolumeGeometry.from_sitk(image).shape == array.shape
