"""Property-based tests of the geometry and prompt code (hypothesis).

Random grids: proper and improper (left-handed) rotations, oblique ones, anisotropic spacings,
odd sizes and origins. What must hold for every one of them: IJK <-> LPS <-> RAS round trips,
agreement with SimpleITK's own index-to-point mapping, slice extraction and re-insertion on every
voxel axis, box clipping that stays inside the slice and keeps what was inside, markups ROIs that
map back to the voxel box they were made from, and model-input boxes that map the slice exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from MedFMSegmentLib.geometry import (VolumeGeometry, in_plane_axes, lps_to_ras, plane_to_voxel_slice, ras_to_lps,
                                      roi_corners, slice_from_volume, slice_into_volume, to_slice_coords)
from MedFMSegmentLib.prompts import Prompts, expand_box, scale_box

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def rotations(draw) -> np.ndarray:
    """A random orthonormal 3x3 matrix, proper or improper (determinant +1 or -1)."""
    values = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=9, max_size=9))
    matrix = np.array(values).reshape(3, 3) + np.eye(3) * draw(st.sampled_from([0.0, 3.0]))  # oblique or near-axial
    q, r = np.linalg.qr(matrix + 1e-3 * np.eye(3))
    q = q @ np.diag(np.sign(np.diag(r)) + (np.diag(r) == 0))
    if draw(st.booleans()):
        q = q @ np.diag([1.0, 1.0, -1.0])  # left-handed
    return q


@st.composite
def grids(draw) -> VolumeGeometry:
    size = tuple(draw(st.integers(1, 12)) for _ in range(3))
    spacing = tuple(draw(st.floats(0.2, 5.0)) for _ in range(3))
    origin = tuple(draw(st.floats(-300, 300)) for _ in range(3))
    return VolumeGeometry(size, spacing, origin, draw(rotations()))


def _points(geometry: VolumeGeometry, seed: int, n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 3)) * (np.array(geometry.size) + 2)


@SETTINGS
@given(grids(), st.integers(0, 2**16))
def test_index_lps_ras_round_trips(geometry, seed):
    ijk = _points(geometry, seed)
    lps = geometry.index_to_lps(ijk)
    np.testing.assert_allclose(geometry.lps_to_index(lps), ijk, atol=1e-7 * (1 + np.abs(ijk).max()))
    ras = geometry.index_to_ras(ijk)
    np.testing.assert_allclose(ras, lps_to_ras(lps), atol=1e-9 * (1 + np.abs(lps).max()))
    np.testing.assert_allclose(ras_to_lps(ras), lps, atol=1e-9 * (1 + np.abs(lps).max()))
    np.testing.assert_allclose(geometry.ras_to_index(ras), ijk, atol=1e-7 * (1 + np.abs(ijk).max()))


@SETTINGS
@given(grids())
def test_matrix_constructors_give_back_the_grid(geometry):
    assert VolumeGeometry.from_ijk_to_lps(geometry.ijk_to_lps(), geometry.size).same_grid(geometry, 1e-9)
    assert VolumeGeometry.from_ijk_to_ras(geometry.ijk_to_ras(), geometry.size).same_grid(geometry, 1e-9)
    assert geometry.is_left_handed == (np.linalg.det(geometry.direction) < 0)


@SETTINGS
@given(grids(), st.integers(0, 2**16))
def test_agrees_with_simpleitk(geometry, seed):
    """Our index -> LPS is ITK's; a SimpleITK image built from the grid reads back the same grid."""
    image = sitk.Image([int(v) for v in geometry.size], sitk.sitkUInt8)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(geometry.direction.ravel()))
    assert VolumeGeometry.from_sitk(image).same_grid(geometry, 1e-9)
    for point in _points(geometry, seed, 3):
        expected = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in point))
        np.testing.assert_allclose(geometry.index_to_lps(point), expected, atol=1e-6 * (1 + np.abs(expected).max()))


@SETTINGS
@given(grids(), st.integers(0, 2), st.data())
def test_slice_extraction_and_reinsertion_on_every_axis(geometry, voxel_axis, data):
    index = data.draw(st.integers(0, geometry.size[voxel_axis] - 1))
    volume = np.arange(np.prod(geometry.shape)).reshape(geometry.shape)
    plane = slice_from_volume(volume, voxel_axis, index)
    row_axis, col_axis = in_plane_axes(voxel_axis)
    assert plane.shape == (geometry.size[row_axis], geometry.size[col_axis])
    r, c = data.draw(st.integers(0, plane.shape[0] - 1)), data.draw(st.integers(0, plane.shape[1] - 1))
    ijk = [0, 0, 0]
    ijk[voxel_axis], ijk[row_axis], ijk[col_axis] = index, r, c
    assert plane[r, c] == volume[ijk[2], ijk[1], ijk[0]]
    assert to_slice_coords(ijk, voxel_axis) == (c, r, index)
    copy = np.zeros_like(volume)
    slice_into_volume(copy, voxel_axis, index, plane)
    np.testing.assert_array_equal(slice_from_volume(copy, voxel_axis, index), plane)
    assert (copy != 0).sum() == (plane != 0).sum()  # nothing written off the slice


@SETTINGS
@given(grids(), st.integers(0, 2), st.data())
def test_a_voxel_plane_is_found_from_its_world_plane(geometry, voxel_axis, data):
    """A view plane lying on a voxel slice (any grid orientation) resolves to that slice."""
    index = data.draw(st.integers(0, geometry.size[voxel_axis] - 1))
    ijk_to_world = geometry.ijk_to_ras()
    normal = np.linalg.inv(ijk_to_world)[voxel_axis, :3]
    centre = np.array(geometry.size, dtype=float) / 2 - 0.5
    centre[voxel_axis] = index
    plane = np.eye(4)
    plane[:3, 2] = normal / np.linalg.norm(normal)
    plane[:3, 3] = (ijk_to_world @ np.append(centre, 1))[:3]
    assert plane_to_voxel_slice(ijk_to_world, geometry.size, plane) == (voxel_axis, index)


@st.composite
def boxes_in(draw, rows: int, cols: int):
    c0, c1 = sorted(draw(st.integers(0, cols - 1)) for _ in range(2))
    r0, r1 = sorted(draw(st.integers(0, rows - 1)) for _ in range(2))
    return (float(c0), float(r0), float(c1), float(r1))


@SETTINGS
@given(st.integers(1, 300), st.integers(1, 300), st.data(), st.floats(0, 50), st.floats(0.1, 4))
def test_box_clipping_stays_inside_and_keeps_the_box(rows, cols, data, margin, factor):
    box = data.draw(boxes_in(rows, cols))
    grown = expand_box(box, margin, (rows, cols))
    assert 0 <= grown[0] <= box[0] and 0 <= grown[1] <= box[1]
    assert box[2] <= grown[2] <= cols - 1 and box[3] <= grown[3] <= rows - 1
    assert expand_box(box, 0.0, (rows, cols)) == box
    scaled = scale_box(box, factor, (rows, cols))
    assert 0 <= scaled[0] <= scaled[2] <= cols - 1 and 0 <= scaled[1] <= scaled[3] <= rows - 1
    np.testing.assert_allclose(scale_box(box, 1.0, (rows, cols)), box)


@SETTINGS
@given(st.integers(1, 600), st.integers(1, 600), st.floats(0.2, 5), st.floats(0.2, 5), st.data())
def test_model_input_maps_the_slice_exactly(rows, cols, row_mm, col_mm, data):
    """The whole slice maps onto the resized region; pixel boxes keep their order and stay inside it."""
    from MedFMSegmentLib.preprocessing import SliceTransform

    transform = SliceTransform.create(rows, cols, 256, (row_mm, col_mm))
    assert 1 <= transform.new_rows <= 256 and 1 <= transform.new_cols <= 256
    full = transform.box_to_input((0, 0, cols - 1, rows - 1))
    np.testing.assert_allclose(full, [0, 0, transform.new_cols - 1, transform.new_rows - 1], atol=1e-3)
    box = data.draw(boxes_in(rows, cols))
    mapped = transform.box_to_input(box)
    # Pixel extents [x0, x1 + 1) keep their order; a one-pixel box on a downscaled slice maps to
    # x1 slightly below x0 (box_to_input subtracts a whole input pixel), so x1 itself may not.
    assert -1e-3 <= mapped[0] < mapped[2] + 1 <= transform.new_cols + 1e-3
    assert -1e-3 <= mapped[1] < mapped[3] + 1 <= transform.new_rows + 1e-3
    inside = transform.mask_to_input(np.ones((rows, cols), bool))
    assert inside[: transform.new_rows, : transform.new_cols].all() and inside.sum() == transform.new_rows * transform.new_cols


@SETTINGS
@given(grids(), st.data(), st.booleans())
def test_markups_roi_maps_back_to_its_voxel_box(geometry, data, ras):
    """An ROI drawn on the voxel axes of any grid (RAS or LPS) gives back exactly its voxel box."""
    from MedFMSegmentLib.batch import _add_markups

    lower = np.array([data.draw(st.integers(0, n - 1)) for n in geometry.size])
    upper = np.array([data.draw(st.integers(int(lo), n - 1)) for lo, n in zip(lower, geometry.size)])
    to_world = geometry.ijk_to_ras() if ras else geometry.ijk_to_lps()
    axes = to_world[:3, :3] / np.array(geometry.spacing)
    centre = (to_world @ np.append((lower + upper) / 2, 1))[:3]
    size = (upper - lower) * np.array(geometry.spacing)
    markup = {"type": "ROI", "coordinateSystem": "RAS" if ras else "LPS", "center": list(centre),
              "size": list(size), "orientation": list(axes.ravel())}
    prompts = Prompts()
    _add_markups({"markups": [markup]}, geometry, prompts)
    assert prompts.box == tuple(int(v) for v in (*lower, *upper))
    prompts.validate(geometry)
    corners = roi_corners(centre, size, axes)
    ijk = (np.linalg.inv(to_world) @ np.c_[corners, np.ones(8)].T).T[:, :3]
    np.testing.assert_allclose(ijk.min(axis=0), lower, atol=1e-6)
    np.testing.assert_allclose(ijk.max(axis=0), upper, atol=1e-6)


@SETTINGS
@given(grids(), st.data())
def test_prompt_validation_accepts_inside_and_refuses_outside(geometry, data):
    from MedFMSegmentLib.errors import InputError

    lower = [data.draw(st.integers(0, n - 1)) for n in geometry.size]
    upper = [data.draw(st.integers(lo, n - 1)) for lo, n in zip(lower, geometry.size)]
    Prompts(box=(*lower, *upper)).validate(geometry)
    axis = data.draw(st.integers(0, 2))
    outside = list(upper)
    outside[axis] = geometry.size[axis]
    with pytest.raises(InputError, match="outside the image"):
        Prompts(box=(*lower, *outside)).validate(geometry)
    if upper[axis] > lower[axis]:
        inverted = list(lower)
        inverted[axis] = upper[axis]
        with pytest.raises(InputError, match="inverted"):
            Prompts(box=(*inverted, *[lower[a] if a == axis else upper[a] for a in range(3)])).validate(geometry)
