"""The Slicer bridge against real MRML classes (the ``slicer-core`` wheel, no Slicer app)."""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="MRML classes (pip package slicer-core) are not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes (install slicer-core)", allow_module_level=True)
import vtk  # noqa: E402

from conftest import dice, ellipsoid_mask, oblique_geometry  # noqa: E402
from MedFMSegmentLib import slicer_bridge as bridge  # noqa: E402
from MedFMSegmentLib.errors import InputError  # noqa: E402
from MedFMSegmentLib.geometry import VolumeGeometry  # noqa: E402
from MedFMSegmentLib.io import MedicalImage  # noqa: E402


# ---------------------------------------------------------------------------- helpers
@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [n for n in range(3) if n != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def linear_transform(scene, matrix: np.ndarray, name: str = "T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def transform_4x4(rot: np.ndarray, shift) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = shift
    return m


def random_image(geometry: VolumeGeometry, seed: int = 0) -> MedicalImage:
    rng = np.random.default_rng(seed)
    return MedicalImage(rng.normal(100, 30, geometry.shape).astype(np.float32), geometry, source="synthetic")


GEOMETRIES = {
    "oblique_left_handed": oblique_geometry(left_handed=True),
    "oblique_right_handed": oblique_geometry(left_handed=False),
    "anisotropic_axis_aligned": VolumeGeometry((12, 10, 7), (0.5, 1.25, 3.0), (5.0, -3.0, 2.0), np.eye(3)),
}


# ---------------------------------------------------------------------------- volumes
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_volume_roundtrip_keeps_voxels_and_geometry(scene, name):
    geometry = GEOMETRIES[name]
    image = random_image(geometry)
    node = bridge.image_to_volume_node(image, scene, "vol")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), geometry.ijk_to_ras(), atol=1e-9)
    back = bridge.volume_node_to_image(node)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.geometry.same_grid(geometry), back.geometry.describe_difference(geometry)
    assert back.geometry.is_left_handed == geometry.is_left_handed
    back.array[0, 0, 0] = -1  # a copy, not a view of the node's voxels
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] != -1


def test_volume_under_linear_transform_gives_world_geometry(scene):
    geometry = GEOMETRIES["oblique_left_handed"]
    node = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    parent = transform_4x4(rotation(2, 30) @ rotation(0, -15), (10.0, -4.0, 7.5))
    node.SetAndObserveTransformNodeID(linear_transform(scene, parent).GetID())
    image = bridge.volume_node_to_image(node)
    np.testing.assert_allclose(image.geometry.ijk_to_ras(), parent @ geometry.ijk_to_ras(), atol=1e-6)
    # A voxel's world position, computed by MRML itself, matches the returned geometry.
    local = geometry.index_to_ras(np.array([3.0, 4.0, 5.0]))
    to_world = vtk.vtkGeneralTransform()
    node.GetParentTransformNode().GetTransformToWorld(to_world)
    world = to_world.TransformPoint(*local)
    np.testing.assert_allclose(image.geometry.index_to_ras(np.array([3.0, 4.0, 5.0])), world, atol=1e-6)


def test_non_linear_parent_transform_is_refused(scene):
    node = bridge.image_to_volume_node(random_image(GEOMETRIES["anisotropic_axis_aligned"]), scene, "vol")
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    grid = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(3, 3, 3)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    grid.SetDisplacementGridData(field)
    transform.SetAndObserveTransformToParent(grid)
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="non-linear"):
        bridge.volume_node_to_image(node)


# ---------------------------------------------------------------------------- prompts
def add_fiducials(scene, points_ras, name="F", parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    for p in points_ras:
        node.AddControlPoint(vtk.vtkVector3d(*p))
    return node


@pytest.mark.parametrize("volume_transformed", [False, True])
def test_fiducials_world_ras_to_voxel_clicks(scene, volume_transformed):
    geometry = GEOMETRIES["oblique_left_handed"]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    to_world = np.eye(4)
    if volume_transformed:
        to_world = transform_4x4(rotation(1, 20), (3.0, 2.0, -6.0))
        volume.SetAndObserveTransformNodeID(linear_transform(scene, to_world, "Tv").GetID())
    positives = np.array([[3, 4, 5], [10, 20, 1]], dtype=float)
    negatives = np.array([[15, 2, 12]], dtype=float)
    jitter = np.array([0.3, -0.4, 0.2])  # off-centre positions round to the voxel

    def world(ijk):
        local = geometry.index_to_ras(ijk + jitter)
        return local @ to_world[:3, :3].T + to_world[:3, 3]

    # The negative points live under their own transform: their *world* positions must count.
    fid_parent = transform_4x4(rotation(2, 45), (1.0, 1.0, 1.0))
    neg_local = (world(negatives) - fid_parent[:3, 3]) @ np.linalg.inv(fid_parent[:3, :3]).T
    pos_node = add_fiducials(scene, world(positives), "pos")
    neg_node = add_fiducials(scene, neg_local, "neg", parent=linear_transform(scene, fid_parent, "Tf"))
    prompts = bridge.markups_to_prompts(volume, positive_fiducial_node=pos_node, negative_fiducial_node=neg_node)
    assert prompts.box is None
    assert prompts.positives == [tuple(p) for p in positives]
    assert prompts.negatives == [tuple(p) for p in negatives]
    prompts.validate(geometry)


def make_roi(scene, center, size, rot=np.eye(3)):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetXYZ(*center)
    roi.SetRadiusXYZ(*(np.asarray(size) / 2.0))
    if not np.allclose(rot, np.eye(3)):
        roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(transform_4x4(rot, center)))
    return roi


def test_rotated_roi_to_sorted_voxel_box(scene):
    geometry = GEOMETRIES["oblique_left_handed"]  # K axis flipped: min/max must be sorted
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    center = geometry.index_to_ras(np.array([10.0, 12.0, 8.0]))
    rot = rotation(2, 35) @ rotation(0, 20)
    roi = make_roi(scene, center, (6.0, 8.0, 10.0), rot)
    corners = bridge.roi_corners_world(roi)
    # The corners are the ROI's: all inside it by MRML's own test (shrunk slightly), centred on it.
    np.testing.assert_allclose(corners.mean(axis=0), center, atol=1e-6)
    inward = center + (corners - center) * 0.99
    assert all(roi.IsPointInROIWorld(p) for p in inward)
    assert not any(roi.IsPointInROIWorld(p) for p in center + (corners - center) * 1.01)
    expected_ijk = geometry.ras_to_index(corners)
    expected = (*np.rint(expected_ijk.min(0)).astype(int), *np.rint(expected_ijk.max(0)).astype(int))
    prompts = bridge.markups_to_prompts(volume, roi_node=roi)
    assert prompts.box == tuple(int(v) for v in expected)
    i0, j0, k0, i1, j1, k1 = prompts.box
    assert i0 <= 10 <= i1 and j0 <= 12 <= j1 and k0 <= 8 <= k1 and i0 < i1 and j0 < j1 and k0 < k1


def test_roi_is_clipped_and_outside_roi_refused(scene):
    geometry = GEOMETRIES["anisotropic_axis_aligned"]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    big = make_roi(scene, geometry.index_to_ras(np.array([5.5, 4.5, 3.0])), (100.0, 100.0, 100.0))
    assert bridge.markups_to_prompts(volume, roi_node=big).box == (0, 0, 0, 11, 9, 6)
    far = make_roi(scene, (500.0, 500.0, 500.0), (5.0, 5.0, 5.0))
    with pytest.raises(InputError, match="outside"):
        bridge.markups_to_prompts(volume, roi_node=far)


def test_roi_under_transformed_volume(scene):
    geometry = GEOMETRIES["anisotropic_axis_aligned"]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    to_world = transform_4x4(rotation(2, 90), (20.0, 0.0, 0.0))
    volume.SetAndObserveTransformNodeID(linear_transform(scene, to_world).GetID())
    # An axis-aligned world ROI around voxels i 2..4, j 3..6, k 1..2 of the transformed volume.
    lo = geometry.index_to_ras(np.array([2.0, 3.0, 1.0]))
    hi = geometry.index_to_ras(np.array([4.0, 6.0, 2.0]))
    world = np.array([lo, hi]) @ to_world[:3, :3].T + to_world[:3, 3]
    roi = make_roi(scene, world.mean(0), np.abs(world[1] - world[0]))
    assert bridge.markups_to_prompts(volume, roi_node=roi).box == (2, 3, 1, 4, 6, 2)


# ---------------------------------------------------------------------------- segments
def new_segmentation(scene, name="seg"):
    return scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)


def blob(shape, center, radii):
    return ellipsoid_mask(shape, center, radii)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_mask_to_segment_is_voxel_exact(scene, name):
    geometry = GEOMETRIES[name]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    seg = new_segmentation(scene)
    shape = geometry.shape
    mask = blob(shape, np.array(shape) / 2, np.array(shape) / 3)
    mask[0, 0, 0] = True  # a corner voxel: nothing may be cropped
    sid = bridge.mask_to_segment(mask, volume, seg, segment_name="Hippo")
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "Hippo"
    reference = seg.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert reference.endswith(f"0;{geometry.size[0] - 1};0;{geometry.size[1] - 1};0;{geometry.size[2] - 1};")
    np.testing.assert_array_equal(bridge.segment_to_mask(seg, sid, volume), mask)
    # The internal labelmap, read without any resampling, is on the volume's grid too.
    internal = slicer.util.arrayFromSegmentInternalBinaryLabelmap(seg, sid)
    assert internal.sum() == mask.sum()
    # Replacing writes exactly the new voxels (nothing left over from the old ones).
    smaller = blob(shape, np.array(shape) / 2, np.array(shape) / 5)
    assert bridge.mask_to_segment(smaller, volume, seg, sid) == sid
    np.testing.assert_array_equal(bridge.segment_to_mask(seg, sid, volume), smaller)
    assert seg.GetSegmentation().GetNumberOfSegments() == 1


def test_mask_to_segment_with_transformed_volume(scene):
    geometry = GEOMETRIES["oblique_right_handed"]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    volume.SetAndObserveTransformNodeID(
        linear_transform(scene, transform_4x4(rotation(0, 25), (4.0, 5.0, 6.0))).GetID())
    seg = new_segmentation(scene)
    mask = blob(geometry.shape, (8, 12, 10), (5, 6, 4))
    sid = bridge.mask_to_segment(mask, volume, seg)
    np.testing.assert_array_equal(bridge.segment_to_mask(seg, sid, volume), mask)


def test_other_segments_are_untouched(scene):
    geometry = GEOMETRIES["oblique_left_handed"]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    seg = new_segmentation(scene)
    shape = geometry.shape
    other = blob(shape, (8, 12, 10), (5, 8, 8))
    other_id = bridge.mask_to_segment(other, volume, seg, segment_name="Other")
    first = blob(shape, (8, 10, 8), (4, 6, 6))  # overlaps "Other"
    assert (first & other).any() and (first & ~other).any()
    first_id = bridge.mask_to_segment(first, volume, seg, segment_name="AI")
    np.testing.assert_array_equal(bridge.segment_to_mask(seg, other_id, volume), other)
    np.testing.assert_array_equal(bridge.segment_to_mask(seg, first_id, volume), first)
    bridge.mask_to_segment(np.zeros(shape, bool), volume, seg, first_id)  # clearing one keeps the other
    np.testing.assert_array_equal(bridge.segment_to_mask(seg, other_id, volume), other)
    assert not bridge.segment_to_mask(seg, first_id, volume).any()


def test_wrong_mask_shape_is_refused(scene):
    volume = bridge.image_to_volume_node(random_image(GEOMETRIES["anisotropic_axis_aligned"]), scene, "vol")
    with pytest.raises(InputError, match="shape"):
        bridge.mask_to_segment(np.zeros((2, 2, 2), bool), volume, new_segmentation(scene))


def test_undo_restores_exactly(scene):
    geometry = GEOMETRIES["oblique_left_handed"]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    seg = new_segmentation(scene)
    shape = geometry.shape
    other = blob(shape, (3, 5, 5), (2, 3, 3))
    other_id = bridge.mask_to_segment(other, volume, seg, segment_name="Other")
    stack = bridge.SegmentUndoStack()

    stack.push(seg, None, volume)  # edit 1 creates the segment
    first = blob(shape, (8, 12, 10), (4, 6, 6))
    sid = bridge.mask_to_segment(first, volume, seg, segment_name="AI")
    stack.set_created_id(sid)
    stack.push(seg, sid, volume)  # edit 2 replaces it
    second = blob(shape, (9, 14, 10), (5, 5, 7))
    bridge.mask_to_segment(second, volume, seg, sid)
    assert len(stack) == 2

    assert stack.undo() == sid
    np.testing.assert_array_equal(bridge.segment_to_mask(seg, sid, volume), first)
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "AI"
    assert stack.undo() == sid
    assert seg.GetSegmentation().GetSegment(sid) is None
    assert stack.undo() is None and not stack.can_undo
    np.testing.assert_array_equal(bridge.segment_to_mask(seg, other_id, volume), other)


def test_undo_stack_is_bounded(scene):
    geometry = GEOMETRIES["anisotropic_axis_aligned"]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    seg = new_segmentation(scene)
    stack = bridge.SegmentUndoStack(max_depth=2)
    sid = bridge.mask_to_segment(blob(geometry.shape, (3, 5, 6), (2, 2, 2)), volume, seg)
    for _ in range(4):
        stack.push(seg, sid, volume)
    assert len(stack) == 2


def test_seg_nrrd_written_by_storage_node_reads_back(scene, tmp_path):
    import slicerio

    geometry = GEOMETRIES["oblique_left_handed"]
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    seg = new_segmentation(scene)
    shape = geometry.shape
    masks = {"A": blob(shape, (8, 12, 10), (4, 6, 6)), "B": blob(shape, (3, 5, 5), (2, 3, 3))}
    ids = {name: bridge.mask_to_segment(m, volume, seg, segment_name=name) for name, m in masks.items()}
    path = tmp_path / "out.seg.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(seg)

    # Read back with slicerio (independent reader): voxels mapped onto the volume grid by geometry.
    data = slicerio.read_segmentation(str(path))
    voxels = np.asarray(data["voxels"])
    file_geometry = VolumeGeometry.from_ijk_to_lps(np.asarray(data["ijkToLPS"]), voxels.shape[:3])
    for name, mask in masks.items():
        segment = next(s for s in data["segments"] if s["name"] == name)
        layer = voxels[..., segment["layer"]] if voxels.ndim == 4 else voxels
        label = (layer == segment["labelValue"]).transpose(2, 1, 0)  # (I,J,K) -> (K,J,I)
        ijk = np.argwhere(label)[:, ::-1].astype(float)  # (i, j, k) in the file's grid
        back = np.rint(geometry.lps_to_index(file_geometry.index_to_lps(ijk))).astype(int)
        recovered = np.zeros(shape, bool)
        recovered[back[:, 2], back[:, 1], back[:, 0]] = True
        np.testing.assert_array_equal(recovered, mask)

    # And through MRML's own reader.
    loaded = new_segmentation(scene, "loaded")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    for name, mask in masks.items():
        sid = loaded.GetSegmentation().GetSegmentIdBySegmentName(name)
        np.testing.assert_array_equal(bridge.segment_to_mask(loaded, sid, volume), mask)
    assert set(ids) == set(masks)


# ---------------------------------------------------------------------------- adapters
def test_list_adapters(tmp_path):
    assert bridge.list_adapters(tmp_path / "missing") == []
    assert bridge.list_adapters(tmp_path) == []
    (tmp_path / "liver").mkdir()
    (tmp_path / "liver" / "metadata.json").write_text(json.dumps({"label_name": "liver", "steps": 200}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metadata.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    found = {a["name"]: a for a in bridge.list_adapters(tmp_path)}
    assert set(found) == {"liver", "broken"}
    assert found["liver"]["steps"] == 200 and found["liver"]["path"] == str(tmp_path / "liver")
    assert "error" in found["broken"]


def test_roi_corners_include_the_roi_parent_transform(scene):
    roi = make_roi(scene, (1.0, 2.0, 3.0), (4.0, 6.0, 8.0), rotation(1, 30))
    parent = transform_4x4(rotation(2, 50), (-7.0, 3.0, 11.0))
    roi.SetAndObserveTransformNodeID(linear_transform(scene, parent).GetID())
    corners = bridge.roi_corners_world(roi)
    np.testing.assert_allclose(corners.mean(axis=0), parent[:3, :3] @ [1.0, 2.0, 3.0] + parent[:3, 3], atol=1e-6)
    center = corners.mean(axis=0)
    assert all(roi.IsPointInROIWorld(p) for p in center + (corners - center) * 0.99)
    assert not any(roi.IsPointInROIWorld(p) for p in center + (corners - center) * 1.01)
