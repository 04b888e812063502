"""The panel's way into Segment Editor: a segmentation and a selected segment for the effect to write into."""

from __future__ import annotations

import slicer

__all__ = ["ensureSegmentation", "openEffect"]


def ensureSegmentation(parameterNode):
    """The panel's segmentation node, created (named after the input volume) when there is none."""
    if not parameterNode.segmentation:
        parameterNode.segmentation = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"{parameterNode.inputVolume.GetName()} MedFMSegment")
        parameterNode.segmentation.CreateDefaultDisplayNodes()
    return parameterNode.segmentation


def openEffect(volumeNode, segmentationNode) -> None:
    """Open Segment Editor on ``volumeNode`` and ``segmentationNode`` with the MedFMSegment effect,
    a segment selected: the effect writes into the selected segment, and Segment Editor activates
    an effect with none selected, so a result would go nowhere. A segmentation without segments
    gets one."""
    from MedFMSegmentHelpers.settings import ensure_library_on_path

    ensure_library_on_path()
    from MedFMSegmentLib.slicer_bridge import add_segment

    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        add_segment(segmentationNode, volumeNode)
    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode(segmentationNode)
    editor.setSourceVolumeNode(volumeNode)
    if not editor.currentSegmentID() or segmentation.GetSegment(editor.currentSegmentID()) is None:
        editor.setCurrentSegmentID(segmentation.GetNthSegmentID(0))
    editor.setActiveEffectByName("MedFMSegment")
