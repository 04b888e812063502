"""Training cases and batch results between scene nodes and the service's arrays.

Fine-tuning and batch jobs run in the service, so the module sends arrays, not files: no temp
folder with patient volumes is written. A training label is checked against its volume's grid
before anything is sent (a label map on another grid would train on misplaced voxels).
"""

from __future__ import annotations

import numpy as np
import slicer

from ..errors import InputError
from ..io import MedicalImage
from .nodes import mask_to_segment, segment_to_mask, volume_geometry, volume_node_to_image

__all__ = ["training_volume_for", "training_pair", "add_result_segmentation"]


def training_volume_for(label_node, default_volume=None):
    """The volume a training label belongs to: a segmentation's reference geometry volume when it
    has one, else ``default_volume`` (the panel's input volume)."""
    if label_node.IsA("vtkMRMLSegmentationNode"):
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        reference = label_node.GetNodeReference(role)
        if reference is not None and reference.IsA("vtkMRMLScalarVolumeNode"):
            return reference
    return default_volume


def training_pair(volume_node, label_node, segment_id: str | None = None) -> tuple[MedicalImage, MedicalImage]:
    """``(image, label)`` of one training case, both on the volume's grid.

    Args:
        volume_node: The training volume.
        label_node: A segmentation (its ``segment_id``, default the first segment, resampled onto
            the volume) or a label map volume (which must be on the volume's grid).

    Raises:
        InputError: no volume, an empty segmentation, a label map on another grid, an empty label.
    """
    if volume_node is None:
        raise InputError(f"no volume for '{label_node.GetName()}': choose the input volume it labels")
    image = volume_node_to_image(volume_node)
    if label_node.IsA("vtkMRMLSegmentationNode"):
        ids = list(label_node.GetSegmentation().GetSegmentIDs())
        if not ids:
            raise InputError(f"the training segmentation '{label_node.GetName()}' has no segment")
        mask = segment_to_mask(label_node, segment_id or ids[0], volume_node)
    else:
        grid = volume_geometry(label_node)
        if not grid.same_grid(image.geometry):
            raise InputError(f"the label map '{label_node.GetName()}' is not on the grid of "
                             f"'{volume_node.GetName()}' ({grid.describe_difference(image.geometry)}); "
                             "resample it first")
        mask = np.asarray(slicer.util.arrayFromVolume(label_node)) > 0
    if not mask.any():
        raise InputError(f"the training label '{label_node.GetName()}' is empty")
    return image, MedicalImage(mask.astype(np.uint8), image.geometry, source=label_node.GetName() or "")


def add_result_segmentation(scene, volume_node, mask: np.ndarray, name: str | None = None):
    """A new segmentation node holding ``mask`` (K, J, I) as one segment named after the volume."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} MedFMSegment")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    mask_to_segment(np.asarray(mask) > 0, volume_node, segmentation, segment_name=volume_node.GetName() or "segment")
    return segmentation
