"""The bridge between 3D Slicer's MRML nodes and the library (the only package that imports ``slicer``).

* :mod:`.nodes`: volumes, markups prompts and segments <-> arrays, prompts and masks, and the
  pure segment-write helpers (``labelmap_from_mask``) shared by the Segment Editor effect.
* :mod:`.interaction`: the Qt-free prompt controller that observes prompt nodes, decides when a
  prompt is complete, talks to the inference service and writes results as they arrive.

Importing the package gives the node conversions (``from MedFMSegmentLib.slicer_bridge import
mask_to_segment``); the interaction layer is imported from its module.
"""

from .nodes import (DEFAULT_SEGMENT_COLOR, SegmentUndoStack, add_segment, image_to_volume_node,
                    labelmap_from_mask, list_adapters, markups_to_prompts, mask_region, mask_to_segment, merged_mask,
                    node_to_world_matrix, roi_corners_world, roi_to_box, segment_to_mask, slice_view_voxel_slice,
                    union_region, volume_geometry, volume_ijk_to_world, volume_node_to_image, write_mask_region)

__all__ = ["DEFAULT_SEGMENT_COLOR", "SegmentUndoStack", "add_segment", "image_to_volume_node", "labelmap_from_mask",
           "list_adapters", "markups_to_prompts", "mask_region", "mask_to_segment", "merged_mask", "node_to_world_matrix",
           "roi_corners_world", "roi_to_box", "segment_to_mask", "slice_view_voxel_slice", "union_region",
           "volume_geometry", "volume_ijk_to_world", "volume_node_to_image", "write_mask_region"]
