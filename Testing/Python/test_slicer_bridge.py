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


# ---------------------------------------------------------------------------- the module's Logic, end to end
MODULE_FILE = __import__("pathlib").Path(__file__).resolve().parents[2] / "MedFMSegment" / "MedFMSegment.py"
HIPPOCAMPUS = "msd_hippocampus_mri/{}/hippocampus_001.nii.gz"


def _framework_stand_ins() -> dict:
    """Minimal stand-ins for the Slicer *application* modules slicer-core lacks (Qt, CTK, module bases).

    They only let ``MedFMSegment.py`` import outside the app; what the tests check (the Logic's
    prompts, model, session and segment writes) runs on real MRML and the real model.
    """
    import types
    import unittest

    modules = {}
    for name in ("qt", "ctk"):
        try:
            __import__(name)
        except ImportError:
            modules[name] = types.ModuleType(name)
    try:
        import slicer.ScriptedLoadableModule  # noqa: F401
    except ImportError:
        slm = types.ModuleType("slicer.ScriptedLoadableModule")

        class _Base:
            def __init__(self, parent=None):
                self.parent = parent

        for cls in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic"):
            setattr(slm, cls, type(cls, (_Base,), {}))

        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, msec=0):
                print(message)

        slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
        modules["slicer.ScriptedLoadableModule"] = slm
    try:
        import slicer.i18n  # noqa: F401
    except ImportError:
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        modules["slicer.i18n"] = i18n
    try:
        import slicer.parameterNodeWrapper  # noqa: F401
    except ImportError:
        pnw = types.ModuleType("slicer.parameterNodeWrapper")
        pnw.parameterNodeWrapper = lambda cls: cls
        pnw.Choice = pnw.Default = pnw.WithinRange = lambda *args, **kwargs: None
        modules["slicer.parameterNodeWrapper"] = pnw
    return modules


@pytest.fixture(scope="module")
def module_file():
    import importlib.util
    import sys

    stand_ins = _framework_stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("MedFMSegment", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


@pytest.fixture(scope="module")
def hippocampus(data_dir):
    from MedFMSegmentLib.io import read_image

    image_path = data_dir / HIPPOCAMPUS.format("imagesTr")
    label_path = data_dir / HIPPOCAMPUS.format("labelsTr")
    if not image_path.is_file() or not label_path.is_file():
        pytest.skip(f"{image_path} or its label is absent")
    return read_image(image_path), read_image(label_path).array > 0


def slice_roi(scene, geometry: VolumeGeometry, box) -> object:
    """An ROI aligned with the volume's voxel axes covering voxel box (i0, j0, k0, i1, j1, k1)."""
    lo, hi = np.array(box[:3], float), np.array(box[3:], float)
    ijk_to_ras = geometry.ijk_to_ras()
    axes = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    if np.linalg.det(axes) < 0:  # ROI axes must be right-handed; a flipped axis gives the same box
        axes[:, 2] *= -1
    size = (hi - lo) * np.asarray(geometry.spacing) + np.where(hi == lo, 0.5 * np.asarray(geometry.spacing), 0)
    return make_roi(scene, geometry.index_to_ras((lo + hi) / 2), size, axes)


def test_logic_segments_hippocampus_like_the_library(scene, module_file, hippocampus, litemedsam):
    from MedFMSegmentLib.inference import SegmentationSession
    from MedFMSegmentLib.prompts import Prompts

    image, label = hippocampus
    volume = bridge.image_to_volume_node(image, scene, "hippocampus_001")
    from_node = bridge.volume_node_to_image(volume)
    np.testing.assert_array_equal(from_node.array, image.array)
    assert from_node.geometry.same_grid(image.geometry)

    axis = image.geometry.voxel_axis_for("axial")
    assert axis == 2  # this case's K axis is axial; the box below is flat along it
    k = int(np.argmax(label.sum(axis=(1, 2))))
    jj, ii = np.nonzero(label[k])
    box = (max(ii.min() - 2, 0), max(jj.min() - 2, 0), k,
           min(ii.max() + 2, image.geometry.size[0] - 1), min(jj.max() + 2, image.geometry.size[1] - 1), k)
    roi = slice_roi(scene, image.geometry, box)
    assert bridge.markups_to_prompts(volume, roi_node=roi).box == box

    logic = module_file.MedFMSegmentLogic()
    logic.set_model(litemedsam)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "hippocampus_001 MedFMSegment")
    sid = logic.segment(volume, segmentation, roi_node=roi, axis="axial")

    expected = SegmentationSession(litemedsam, image, axis="axial").segment(Prompts(box=box))
    written = bridge.segment_to_mask(segmentation, sid, volume)
    np.testing.assert_array_equal(written, expected)
    assert written[k].any() and not np.delete(written, k, axis=0).any()
    truth = label[k]
    assert dice(written[k], truth) > 0.5, dice(written[k], truth)

    # A second prompt on the same slice reuses the cached embedding and replaces the same segment.
    session = logic.session_for(volume, "axial")
    misses = session.cache.misses
    roi.SetRadiusXYZ(*(np.array(roi.GetSize()) / 2 + [1.0, 1.0, 0.0]))
    assert logic.segment(volume, segmentation, roi_node=roi) == sid
    assert session.cache.misses == misses and logic.session_for(volume, "axial") is session
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1

    # Undo twice: first back to the first result, exactly, then no segment at all.
    assert logic.undo() == sid
    np.testing.assert_array_equal(bridge.segment_to_mask(segmentation, sid, volume), expected)
    assert logic.undo() == sid
    assert segmentation.GetSegmentation().GetSegment(sid) is None


def test_progress_lines_and_commands(module_file, tmp_path):
    parse = module_file.parse_progress
    assert parse("step 50/200 loss 0.31") == 0.25
    assert parse("case 3/3 done") == 1.0
    assert parse("progress 40%") == 0.4
    assert parse("loading model") is None
    logic = module_file.MedFMSegmentLogic()
    args = logic.finetuneCommand([("img.nii.gz", "lbl.nii.gz"), ("img2.nii.gz", "lbl2.nii.gz")], tmp_path / "adapter",
                                 steps=20, rank=8, device="cpu")
    assert args[1:4] == ["-m", "MedFMSegmentLib.cli", "finetune"]
    assert args[4:12] == ["--image", "img.nii.gz", "--label", "lbl.nii.gz",
                          "--image", "img2.nii.gz", "--label", "lbl2.nii.gz"]
    assert args[args.index("--steps") + 1] == "20" and args[args.index("-o") + 1] == str(tmp_path / "adapter")
    args = logic.batchCommand(["a.nii.gz", "b.nii.gz"], tmp_path, adapter=tmp_path / "adapter")
    assert args[3:6] == ["batch", "a.nii.gz", "b.nii.gz"] and args[args.index("--adapter") + 1] == str(tmp_path / "adapter")


def test_logic_exports_training_pair_on_the_volume_grid(scene, module_file, tmp_path):
    from MedFMSegmentLib.io import read_image

    geometry = GEOMETRIES["oblique_left_handed"]
    image = random_image(geometry)
    volume = bridge.image_to_volume_node(image, scene, "my volume")
    seg = new_segmentation(scene)
    mask = blob(geometry.shape, (8, 12, 10), (4, 6, 6))
    bridge.mask_to_segment(mask, volume, seg)
    image_path, label_path = module_file.MedFMSegmentLogic().exportTrainingPair(volume, seg, tmp_path)
    back, back_label = read_image(image_path), read_image(label_path)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_array_equal(back_label.array > 0, mask)
    assert back.geometry.same_grid(geometry) and back_label.geometry.same_grid(geometry)


def test_logic_pairs_each_training_label_with_its_volume(scene, module_file):
    geometry = GEOMETRIES["oblique_left_handed"]
    drawn_on = bridge.image_to_volume_node(random_image(geometry), scene, "case A")
    shown = bridge.image_to_volume_node(random_image(geometry), scene, "case B")
    seg = new_segmentation(scene)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(drawn_on)
    no_reference = new_segmentation(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    logic = module_file.MedFMSegmentLogic
    assert logic.trainingVolumeFor(seg, shown) is drawn_on
    assert logic.trainingVolumeFor(no_reference, shown) is shown
    assert logic.trainingVolumeFor(labelmap, shown) is shown
    assert logic.trainingVolumeFor(no_reference) is None


def test_module_self_test_runs_on_real_mrml(module_file, monkeypatch, scene):
    """The in-Slicer self-test (synthetic sphere, one-slice ROI, Dice, undo), run on a slicer-core scene."""
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    test = module_file.MedFMSegmentTest("test_MedFMSegment_sphere")
    assert not module_file.missing_dependencies()
    test.setUp()
    test.test_MedFMSegment_sphere()
    segmentation = scene.GetFirstNodeByName("Result")
    assert segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() == 0  # undone


def test_batch_export_and_result_loading(module_file, monkeypatch, scene, tmp_path):
    """Volumes go out as NIfTI on their grid; label files coming back become segmentations named after them."""
    from MedFMSegmentLib.io import read_image, write_label

    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    logic = module_file.MedFMSegmentLogic()
    volumes, masks = [], {}
    for number, name in enumerate(("oblique_left_handed", "anisotropic_axis_aligned")):
        geometry = GEOMETRIES[name]
        volumes.append(bridge.image_to_volume_node(random_image(geometry, seed=number), scene, f"case {name}"))
        masks[volumes[-1].GetID()] = blob(geometry.shape, np.array(geometry.shape) / 2, np.array(geometry.shape) / 4)
    inputs = logic.exportVolumes(volumes, tmp_path / "input")
    output = tmp_path / "output"
    output.mkdir()
    for volume in volumes:
        exported = read_image(inputs[volume.GetID()])
        np.testing.assert_array_equal(exported.array, slicer.util.arrayFromVolume(volume))
        assert exported.geometry.same_grid(bridge.volume_node_to_image(volume).geometry)
        stem = __import__("pathlib").Path(inputs[volume.GetID()]).name.split(".")[0]
        write_label(masks[volume.GetID()], exported.geometry, output / f"{stem}.seg.nrrd")
    created = logic.loadBatchResults(inputs, output)
    assert [s.GetName() for s in created] == [f"{v.GetName()} segmentation" for v in volumes]
    for volume, segmentation in zip(volumes, created):
        sid = segmentation.GetSegmentation().GetNthSegmentID(0)
        np.testing.assert_array_equal(bridge.segment_to_mask(segmentation, sid, volume), masks[volume.GetID()])


def test_logic_passes_the_3d_box_strategy(scene, module_file):
    """Plumbing with a tiny random-weight model: the panel's "3D box" choice reaches the session,
    and the segment written is the library's consensus result, voxel for voxel."""
    from MedFMSegmentLib.models import tiny_random_model_for_tests
    from MedFMSegmentLib.inference import PredictorSettings, SegmentationSession
    from MedFMSegmentLib.prompts import Prompts

    geometry = oblique_geometry(size=(40, 36, 24), spacing=(0.8, 0.9, 1.5))
    image = MedicalImage(ellipsoid_mask(geometry.shape, (12, 18, 20), (6, 9, 12)).astype(np.float32) * 100.0
                         + random_image(geometry).array * 0.1, geometry)
    volume = bridge.image_to_volume_node(image, scene, "ellipsoid")
    box = (9, 10, 7, 31, 26, 17)
    roi = slice_roi(scene, geometry, box)
    assert bridge.markups_to_prompts(volume, roi_node=roi).box == box
    model = tiny_random_model_for_tests()
    logic = module_file.MedFMSegmentLogic()
    logic.set_model(model)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "consensus")
    progress = []
    sid = logic.segment(volume, segmentation, roi_node=roi, box3d_strategy="consensus",
                        progress=lambda done, planned: progress.append((done, planned)))
    assert progress and progress[-1] == (14, 14)  # 2 propagations + 6 + 6 rounds, as the panel shows them
    session = logic.session_for(volume)
    assert session.settings.box3d_strategy == "consensus"
    assert {axis for axis, _ in session.cache.keys()} == {0, 1, 2}  # embedded along all three axes
    expected = SegmentationSession(model, image, settings=PredictorSettings(box3d_strategy="consensus")).segment(
        Prompts(box=box))
    np.testing.assert_array_equal(bridge.segment_to_mask(segmentation, sid, volume), expected)
    with pytest.raises(InputError, match="3D box strategy"):
        logic.segment(volume, segmentation, roi_node=roi, box3d_strategy="vote")


def test_logic_embeds_the_viewed_slice_in_the_background(scene, module_file):
    """Plumbing with a tiny random-weight model: a slice view resting on a voxel plane of an
    oblique, left-handed volume gets that slice and its neighbours embedded, off the UI thread."""
    from MedFMSegmentLib.models import tiny_random_model_for_tests

    geometry = oblique_geometry(size=(30, 28, 18), spacing=(0.8, 0.9, 1.5), left_handed=True)
    volume = bridge.image_to_volume_node(random_image(geometry), scene, "vol")
    ijk_to_world = bridge.volume_ijk_to_world(volume)
    normal = np.linalg.inv(ijk_to_world)[2, :3]
    slice_to_ras = np.eye(4)
    helper = np.cross([1.0, 0, 0], normal)
    slice_to_ras[:3, 0] = helper / np.linalg.norm(helper)
    slice_to_ras[:3, 2] = normal / np.linalg.norm(normal)
    slice_to_ras[:3, 1] = np.cross(slice_to_ras[:3, 2], slice_to_ras[:3, 0])
    slice_to_ras[:3, 3] = (ijk_to_world @ [14.0, 13.0, 9.2, 1.0])[:3]

    logic = module_file.MedFMSegmentLogic()
    assert logic.focusSliceView(volume, slice_to_ras) is None  # no model loaded yet: nothing starts
    logic.set_model(tiny_random_model_for_tests())
    assert logic.focusSliceView(volume, slice_to_ras) == (2, 9)
    embedder = logic.backgroundEmbedder(volume)
    assert embedder.wait_idle(timeout=60)
    session = logic.session_for(volume)
    assert sorted(session.cache.keys()) == [(2, k) for k in (7, 8, 9, 10, 11)]
    assert embedder.session is session
    logic.clear()  # scene closed: the worker is told to stop, without blocking the UI thread
    assert embedder.stopped and logic.backgroundEmbedder(volume) is None
    embedder.stop(timeout=10)
    assert not embedder.running


def test_logic_sessions_share_one_bounded_embedding_cache(scene, module_file):
    """Plumbing with a tiny random-weight model: every volume's session draws on one embedding
    cache (one budget however many volumes are prompted), and a volume whose voxels change
    drops its old embeddings from it."""
    import torch

    from MedFMSegmentLib.models import tiny_random_model_for_tests

    geometry = oblique_geometry(size=(20, 18, 6), spacing=(0.8, 0.9, 1.5))
    first = bridge.image_to_volume_node(random_image(geometry, seed=1), scene, "first")
    second = bridge.image_to_volume_node(random_image(geometry, seed=2), scene, "second")
    logic = module_file.MedFMSegmentLogic()
    logic.set_model(tiny_random_model_for_tests())
    a, b = logic.session_for(first, "axial"), logic.session_for(second, "axial")
    store = logic.embeddingCache()
    assert a.cache.store is store and b.cache.store is store and store.max_bytes == 1 << 30
    a.embedding(2), b.embedding(2), b.embedding(3)
    assert a.cache.keys() == [(2, 2)] and sorted(b.cache.keys()) == [(2, 2), (2, 3)] and len(store) == 3
    assert not torch.equal(a.embedding(2), b.embedding(2))  # same slice index, other volume, own entry
    bridge.image_to_volume_node(random_image(geometry, seed=3), scene, "unused")  # other nodes: no effect
    array = slicer.util.arrayFromVolume(second)
    array += 1
    slicer.util.arrayFromVolumeModified(second)
    renewed = logic.session_for(second, "axial")
    assert renewed is not b and renewed.cache.store is store
    assert len(store) == 1 and renewed.cache.keys() == [] and a.cache.keys() == [(2, 2)]
