"""Node conversions of the bridge between 3D Slicer's MRML nodes and the library's arrays, prompts and masks.

This is the only library module that imports ``slicer`` (and ``vtk`` through it). It works both
inside the Slicer application and with the ``slicer-core`` wheel (real MRML classes without the
app), because it only uses calls that need no ``slicer.app``: ``arrayFromVolume``,
``updateVolumeFromArray``, ``vtkOrientedImageData`` and the static methods of
``vtkSlicerSegmentationsModuleLogic``.

Conventions are those of :mod:`MedFMSegmentLib.geometry`: arrays are ``(K, J, I)``, prompts are
voxel indices ``(i, j, k)``, and every geometry matrix comes from
:class:`~MedFMSegmentLib.geometry.VolumeGeometry`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from ..geometry import VolumeGeometry, roi_corners
from ..io import MedicalImage
from ..prompts import Prompts

__all__ = ["add_segment", "DEFAULT_SEGMENT_COLOR", "image_to_volume_node", "labelmap_from_mask",
           "list_adapters", "markups_to_prompts", "mask_region", "mask_to_segment", "merged_mask",
           "node_to_world_matrix", "roi_corners_world", "roi_to_box", "segment_to_mask", "SegmentUndoStack",
           "slice_view_voxel_slice", "union_region", "volume_geometry", "volume_ijk_to_world",
           "volume_node_to_image", "volume_shape", "write_mask_region"]

#: Colour given to segments the AI creates (RGB in 0..1).
DEFAULT_SEGMENT_COLOR = (0.9, 0.3, 0.2)


# ---------------------------------------------------------------------------- matrices
def _array_from_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array(slicer.util.arrayFromVTKMatrix(matrix), dtype=float)


def _matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    return slicer.util.vtkMatrixFromArray(np.asarray(array, dtype=float))


def node_to_world_matrix(node) -> np.ndarray:
    """4x4 matrix from a transformable node's local coordinates to world RAS.

    Raises:
        InputError: the node is under a non-linear (warping) transform.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"'{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
                         "harden or remove it first")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return _array_from_matrix(matrix)


def volume_ijk_to_world(volume_node) -> np.ndarray:
    """4x4 matrix from the volume's voxel indices (i, j, k) to world RAS (parent transform applied)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return node_to_world_matrix(volume_node) @ _array_from_matrix(matrix)


def slice_view_voxel_slice(volume_node, slice_to_ras: np.ndarray) -> tuple[int, int] | None:
    """``(voxel_axis, index)`` of the volume slice a slice view shows (``SliceToRAS`` as a 4x4
    array), or None when the view is oblique to the voxel grid or outside the volume."""
    from ..geometry import plane_to_voxel_slice

    size = volume_node.GetImageData().GetDimensions()
    return plane_to_voxel_slice(volume_ijk_to_world(volume_node), size, np.asarray(slice_to_ras, dtype=float))


def volume_geometry(volume_node) -> VolumeGeometry:
    """The volume's grid in world coordinates (its linear parent transform included)."""
    dims = volume_node.GetImageData().GetDimensions()
    return VolumeGeometry.from_ijk_to_ras(volume_ijk_to_world(volume_node), dims)


# ---------------------------------------------------------------------------- volumes
def volume_node_to_image(volume_node) -> MedicalImage:
    """Copy a scalar volume node into a :class:`~MedFMSegmentLib.io.MedicalImage`.

    The geometry is in *world* coordinates: when the volume sits under a linear parent transform,
    that transform is composed with the volume's IJK-to-RAS matrix, so the image is where the user
    sees it. Voxel indices are unchanged by this, so prompts and masks stay aligned either way.

    Args:
        volume_node: A ``vtkMRMLScalarVolumeNode`` with image data.

    Returns:
        float32 ``(K, J, I)`` copy of the voxels and the world geometry.

    Raises:
        InputError: no image data, a multi-component volume, or a non-linear parent transform.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("the volume has no image data")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"'{volume_node.GetName()}' is not a scalar volume")
    array = np.array(slicer.util.arrayFromVolume(volume_node), dtype=np.float32, copy=True)
    return MedicalImage(array, volume_geometry(volume_node), source=volume_node.GetName() or "")


def image_to_volume_node(image: MedicalImage, scene, name: str = "Volume"):
    """Create a scalar volume node in ``scene`` holding ``image`` on its exact grid.

    Args:
        image: The image; its geometry becomes the node's IJK-to-RAS matrix.
        scene: A ``vtkMRMLScene`` (``slicer.mrmlScene`` in the app).
        name: Node name.

    Returns:
        The new ``vtkMRMLScalarVolumeNode``.
    """
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_matrix_from_array(image.geometry.ijk_to_ras()))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(image.array))
    return node


# ---------------------------------------------------------------------------- prompts
def _world_to_ijk(volume_node, points_ras: np.ndarray) -> np.ndarray:
    """World RAS points ``(N, 3)`` -> continuous voxel indices ``(N, 3)`` of the volume."""
    return volume_geometry(volume_node).ras_to_index(np.asarray(points_ras, dtype=float).reshape(-1, 3))


def _control_points_world(markups_node) -> np.ndarray:
    points = []
    if markups_node is not None:
        for n in range(markups_node.GetNumberOfControlPoints()):
            if hasattr(markups_node, "GetNthControlPointPositionStatus") and \
                    markups_node.GetNthControlPointPositionStatus(n) != markups_node.PositionDefined:
                continue  # a point being placed has no position yet
            position = [0.0, 0.0, 0.0]
            markups_node.GetNthControlPointPositionWorld(n, position)
            points.append(position)
    return np.array(points, dtype=float).reshape(-1, 3)


def roi_corners_world(roi_node) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of a (possibly rotated, possibly transformed) ROI in world RAS."""
    object_to_world = _array_from_matrix(roi_node.GetObjectToWorldMatrix())
    return roi_corners(object_to_world[:3, 3], roi_node.GetSize(), object_to_world[:3, :3])


def roi_to_box(volume_node, roi_node) -> tuple[int, int, int, int, int, int] | None:
    """Voxel box ``(i0, j0, k0, i1, j1, k1)`` covering an ROI, clipped to the volume.

    Each of the ROI's 8 world corners is mapped to voxel indices; the box is the per-axis
    min/max (sorted, whatever the orientation of volume and ROI), rounded and clipped.

    Returns:
        The box, or None when the ROI does not overlap the volume.
    """
    ijk = _world_to_ijk(volume_node, roi_corners_world(roi_node))
    size = np.array(volume_node.GetImageData().GetDimensions())
    lower = np.rint(ijk.min(axis=0)).astype(int)
    upper = np.rint(ijk.max(axis=0)).astype(int)
    if np.any(upper < 0) or np.any(lower > size - 1):
        return None
    lower = np.clip(lower, 0, size - 1)
    upper = np.clip(upper, 0, size - 1)
    return tuple(int(v) for v in (*lower, *upper))


def markups_to_prompts(volume_node, roi_node=None, positive_fiducial_node=None,
                       negative_fiducial_node=None) -> Prompts:
    """Turn markups into voxel prompts on ``volume_node``.

    Control point positions are taken in world RAS (their parent transforms applied), brought
    into the volume's voxel frame through its world-to-IJK matrix (the volume's own parent
    transform included) and rounded to the nearest voxel.

    Args:
        volume_node: The volume the prompts refer to.
        roi_node: Optional ``vtkMRMLMarkupsROINode`` box (may be rotated).
        positive_fiducial_node: Optional fiducials on the structure.
        negative_fiducial_node: Optional fiducials on the background.

    Returns:
        :class:`~MedFMSegmentLib.prompts.Prompts` in voxel indices (not yet validated).

    Raises:
        InputError: an ROI that lies entirely outside the volume.
    """
    box = None
    if roi_node is not None and roi_node.GetNumberOfControlPoints() > 0:
        box = roi_to_box(volume_node, roi_node)
        if box is None:
            raise InputError(f"the ROI '{roi_node.GetName()}' is outside the volume '{volume_node.GetName()}'")

    def voxels(node) -> list[tuple[float, float, float]]:
        ijk = np.rint(_world_to_ijk(volume_node, _control_points_world(node)))
        return [tuple(float(v) for v in p) for p in ijk]

    return Prompts(box=box, positives=voxels(positive_fiducial_node), negatives=voxels(negative_fiducial_node))


# ---------------------------------------------------------------------------- segments
def _image_to_segmentation_matrix(volume_node, segmentation_node) -> np.ndarray:
    """Volume IJK -> the segmentation node's local RAS (both nodes' linear transforms applied)."""
    return np.linalg.inv(node_to_world_matrix(segmentation_node)) @ volume_ijk_to_world(volume_node)


def volume_shape(volume_node) -> tuple[int, int, int]:
    """The (K, J, I) shape of a volume node's voxel array."""
    return tuple(reversed(volume_node.GetImageData().GetDimensions()))


def mask_region(mask: np.ndarray) -> tuple[int, int, int, int, int, int] | None:
    """``(k0, k1, j0, j1, i0, i1)`` inclusive bounds of the True voxels of a (K, J, I) mask, or None."""
    found = np.argwhere(np.asarray(mask))
    if found.size == 0:
        return None
    lower, upper = found.min(axis=0), found.max(axis=0)
    return (int(lower[0]), int(upper[0]), int(lower[1]), int(upper[1]), int(lower[2]), int(upper[2]))


def union_region(a, b):
    """The smallest region holding both (either may be None)."""
    if a is None or b is None:
        return a if b is None else b
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]), min(a[4], b[4]), max(a[5], b[5]))


def labelmap_from_mask(mask: np.ndarray, volume_node, segmentation_node, region=None):
    """A ``vtkOrientedImageData`` holding ``mask`` (K, J, I) on the volume's voxel grid.

    The image's extent is ``region`` (``(k0, k1, j0, j1, i0, i1)`` inclusive voxel bounds; the
    whole volume when None), so a write that changed one slice carries one slice. Its
    image-to-world matrix maps volume IJK into the segmentation node's local frame, so it can be
    handed to Segment Editor (``modifySelectedSegmentByLabelmap``) or to
    ``vtkSlicerSegmentationsModuleLogic`` alike. No node is created.
    """
    mask = np.asarray(mask)
    if mask.shape != volume_shape(volume_node):
        raise InputError(f"mask shape {mask.shape} does not match the volume {volume_shape(volume_node)}")
    k0, k1, j0, j1, i0, i1 = region if region is not None else (0, mask.shape[0] - 1, 0, mask.shape[1] - 1,
                                                                   0, mask.shape[2] - 1)
    part = np.ascontiguousarray(mask[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] > 0, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = part.ravel()
    image.SetImageToWorldMatrix(_matrix_from_array(_image_to_segmentation_matrix(volume_node, segmentation_node)))
    return image


def _oriented_image_from_mask(mask: np.ndarray, ijk_to_segmentation: np.ndarray):
    mask = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    k, j, i = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.ravel()
    image.SetImageToWorldMatrix(_matrix_from_array(ijk_to_segmentation))
    return image


def add_segment(segmentation_node, volume_node, segment_name: str = "MedFMSegment",
                color: Sequence[float] = DEFAULT_SEGMENT_COLOR) -> str:
    """Add an empty segment (reference geometry from the volume when the segmentation is empty)."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return mask_to_segment(np.zeros(volume_shape(volume_node), bool), volume_node, segmentation_node, None,
                           segment_name, color)


def write_mask_region(mask: np.ndarray, region, volume_node, segmentation_node, segment_id: str) -> None:
    """Replace ``segment_id``'s voxels inside ``region`` by ``mask``'s, keeping the rest of the segment.

    The library's writer for scripts and tests; inside Segment Editor the effect writes
    :func:`labelmap_from_mask`'s image with ``modifySelectedSegmentByLabelmap`` instead.
    """
    mask_to_segment(merged_mask(mask, region, volume_node, segmentation_node, segment_id), volume_node,
                    segmentation_node, segment_id)


def merged_mask(mask: np.ndarray, region, volume_node, segmentation_node, segment_id: str | None) -> np.ndarray:
    """The segment's (K, J, I) voxels with ``region`` taken from ``mask`` (all of ``mask`` when
    ``region`` is None, or when the segment does not exist yet). Pure: nothing is written."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if region is None or segment is None:
        return np.asarray(mask) > 0
    current = segment_to_mask(segmentation_node, segment_id, volume_node)
    k0, k1, j0, j1, i0, i1 = region
    current[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = np.asarray(mask)[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] > 0
    return current


def mask_to_segment(mask: np.ndarray, volume_node, segmentation_node, segment_id: str | None = None,
                    segment_name: str = "MedFMSegment", color: Sequence[float] = DEFAULT_SEGMENT_COLOR) -> str:
    """Write a ``(K, J, I)`` mask on ``volume_node``'s grid into one segment, voxel for voxel.

    The segmentation's reference geometry is set from the volume when it has no segment yet. Only the
    target segment changes: other segments keep their voxels. An existing segment is replaced
    (``MODE_REPLACE``); a missing ``segment_id`` creates a segment named ``segment_name``.

    Args:
        mask: Boolean or 0/1 array of the volume's shape.
        volume_node: The volume whose voxel grid the mask is on.
        segmentation_node: Target ``vtkMRMLSegmentationNode``.
        segment_id: Segment to replace, or None (or an id not in the segmentation) to add one.
        segment_name: Name of a new segment.
        color: RGB of a new segment.

    Returns:
        The segment's id.
    """
    mask = np.asarray(mask)
    if mask.shape != volume_shape(volume_node):
        raise InputError(f"mask shape {mask.shape} does not match the volume {volume_shape(volume_node)}")
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    labelmap = _oriented_image_from_mask(mask, _image_to_segmentation_matrix(volume_node, segmentation_node))
    if segment_id and segmentation.GetSegment(segment_id) is not None:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        if not ok:
            raise RuntimeError(f"could not write segment {segment_id}")
        return segment_id
    segment = slicer.vtkSegment()
    segment.SetName(segment_name)
    segment.SetColor(*[float(c) for c in color])
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
    new_id = segment_id or segmentation.GenerateUniqueSegmentID(segment_name)
    segmentation.AddSegment(segment, new_id)
    return new_id


def segment_to_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """One segment as a ``(K, J, I)`` boolean mask on ``volume_node``'s grid.

    The segment's binary labelmap (a ``vtkOrientedImageData``, possibly a layer shared with other
    segments) is resampled onto the volume's voxels (nearest neighbour) and compared with the
    segment's label value. No node is added to the scene (an export to a label map node would add
    a colour table and a display node that removing the label map leaves behind).
    """
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"segment {segment_id!r} is not in '{segmentation_node.GetName()}'")
    shape = volume_shape(volume_node)
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    source = segment.GetRepresentation(name)
    if source is None or source.GetPointData().GetScalars() is None:
        return np.zeros(shape, bool)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    reference.SetImageToWorldMatrix(_matrix_from_array(_image_to_segmentation_matrix(volume_node, segmentation_node)))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            source, reference, resampled, False, True):
        raise RuntimeError(f"could not resample segment {segment_id}")
    if resampled.GetPointData().GetScalars() is None:
        return np.zeros(shape, bool)
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape)
    return values == segment.GetLabelValue()


@dataclass
class _Snapshot:
    segmentation_node: object
    segment_id: str
    volume_node: object
    mask: np.ndarray | None  # None: the segment did not exist
    written: np.ndarray | None = None  # the segment right after the AI edit
    name: str = ""
    color: tuple[float, float, float] = DEFAULT_SEGMENT_COLOR


class SegmentUndoStack:
    """Per-edit snapshots of one segment, so an AI edit made outside Segment Editor can be undone.

    Call :meth:`push` before each write and :meth:`record_written` after it; :meth:`undo` restores
    the segment's previous voxels (or removes a segment the edit created) only when the segment
    still holds what the edit wrote: a manual edit made since is never discarded (the undo is
    refused with :class:`InputError`, and Segment Editor's own undo applies).

    Args:
        max_depth: Snapshots kept; older ones are dropped.
    """

    def __init__(self, max_depth: int = 10) -> None:
        self.max_depth = max_depth
        self._snapshots: list[_Snapshot] = []

    def __len__(self) -> int:
        return len(self._snapshots)

    @property
    def can_undo(self) -> bool:
        return bool(self._snapshots)

    def push(self, segmentation_node, segment_id: str | None, volume_node) -> None:
        """Snapshot ``segment_id`` (or mark it as absent) before it is changed."""
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
        if segment is None:
            snapshot = _Snapshot(segmentation_node, segment_id or "", volume_node, None)
        else:
            snapshot = _Snapshot(segmentation_node, segment_id, volume_node,
                                 segment_to_mask(segmentation_node, segment_id, volume_node),
                                 name=segment.GetName(), color=tuple(segment.GetColor()))
        self._snapshots.append(snapshot)
        del self._snapshots[:-self.max_depth]

    def set_created_id(self, segment_id: str) -> None:
        """Record the id of the segment the last edit created (when it was pushed with no id)."""
        if self._snapshots and self._snapshots[-1].mask is None:
            self._snapshots[-1].segment_id = segment_id

    def record_written(self) -> None:
        """Remember what the last edit left in its segment (call after the write)."""
        if self._snapshots:
            snap = self._snapshots[-1]
            snap.written = segment_to_mask(snap.segmentation_node, snap.segment_id, snap.volume_node)

    def undo(self) -> str | None:
        """Restore the last snapshot; returns the segment id it touched, or None when empty.

        Raises:
            InputError: the segment was edited after the AI edit (nothing is changed).
        """
        if not self._snapshots:
            return None
        snap = self._snapshots[-1]
        segmentation = snap.segmentation_node.GetSegmentation()
        exists = bool(snap.segment_id) and segmentation.GetSegment(snap.segment_id) is not None
        if snap.written is not None and exists and not np.array_equal(
                segment_to_mask(snap.segmentation_node, snap.segment_id, snap.volume_node), snap.written):
            raise InputError("the segment was edited after the AI edit; use Segment Editor's undo")
        self._snapshots.pop()
        if snap.mask is None:
            if exists:
                segmentation.RemoveSegment(snap.segment_id)
        else:
            mask_to_segment(snap.mask, snap.volume_node, snap.segmentation_node, snap.segment_id,
                            snap.name, snap.color)
        return snap.segment_id

    def clear(self) -> None:
        self._snapshots.clear()


# ---------------------------------------------------------------------------- adapters
def list_adapters(folder: str | os.PathLike | None) -> list[dict]:
    """Adapters found under ``folder``: one dict per sub-folder holding a ``metadata.json``.

    Each dict is the metadata plus ``"path"`` (the adapter folder) and ``"name"`` (the metadata's
    name, else the folder name). A missing folder, or one with no adapters, gives an empty list;
    an unreadable metadata file gives an entry with an ``"error"`` key instead of failing.
    """
    if not folder:
        return []
    root = Path(folder)
    if not root.is_dir():
        return []
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    found = []
    for directory in candidates:
        meta_path = directory / "metadata.json"
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a JSON object")
        except (OSError, ValueError) as exc:
            meta = {"error": f"unreadable metadata.json: {exc}"}
        found.append({**meta, "path": str(directory), "name": meta.get("name") or directory.name})
    return found
