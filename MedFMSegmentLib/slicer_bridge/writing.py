"""What the prompt controller talks to (the service, a segment writer) and how planes become regions.

* :class:`PromptRunner`: the verbs of ``MedFMSegmentLib.service.client.ServiceClient`` the
  controller's calls name (:mod:`.transport` sends them as HTTP, or runs them on any object with
  these methods through ``RunnerTransport``).
* :class:`SegmentWriter`: where results go; :class:`LibrarySegmentWriter` writes with
  :func:`~.nodes.write_mask_region` and keeps an undo snapshot per prompt, the Segment Editor
  effect writes through ``modifySelectedSegmentByLabelmap`` instead.
* Regions are ``(k0, k1, j0, j1, i0, i1)`` inclusive voxel bounds of the (K, J, I) array.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from ..geometry import array_axis, slice_into_volume, voxel_axis_of
from ..prompts import Prompts
from .nodes import SegmentUndoStack, add_segment, write_mask_region

__all__ = ["Region", "PromptRunner", "SegmentWriter", "LibrarySegmentWriter", "plane_region", "apply_plane",
           "update_region"]

Region = tuple[int, int, int, int, int, int]  # (k0, k1, j0, j1, i0, i1), inclusive


class PromptRunner(Protocol):
    """The verbs the controller's calls name (those of ``MedFMSegmentLib.service.client.ServiceClient``)."""

    def upload_volume(self, array_kji: np.ndarray, geometry: Any, is_2d: bool = False) -> str: ...

    def prompt(self, volume_id: str, prompts: Prompts, *, axis: Any = "auto", model: str | None = None,
               adapter: str | None = None, box3d_strategy: str | None = None,
               propagate: bool | None = None) -> Any: ...

    def job(self, job_id: str) -> Any: ...

    def updates(self, job_id: str, since: int = 0) -> tuple[int, list]: ...

    def result(self, job_id: str) -> np.ndarray: ...

    def cancel(self, job_id: str) -> None: ...


class SegmentWriter(Protocol):
    """Where results go: :class:`LibrarySegmentWriter`, or the effect's Segment Editor writer."""

    def begin(self) -> None:
        """A new prompt's first write follows (one undo step per prompt)."""

    def write(self, mask: np.ndarray, region: Region) -> None:
        """Replace the segment's voxels inside ``region`` by ``mask``'s (K, J, I)."""

    def end(self) -> None:
        """The prompt's final result was written."""


class LibrarySegmentWriter:
    """Writes into one segment with :func:`write_mask_region`, an undo snapshot per prompt.

    Args:
        volume_node: The volume the masks are on.
        segmentation_node: Target segmentation; the segment is created on first write.
        segment_id: Segment to write (None: a new segment named ``segment_name``).
        undo: Undo stack (one is created when None).
    """

    def __init__(self, volume_node, segmentation_node, segment_id: str | None = None,
                 undo: SegmentUndoStack | None = None, segment_name: str = "MedFMSegment") -> None:
        self.volume_node, self.segmentation_node = volume_node, segmentation_node
        self.segment_id, self.segment_name = segment_id, segment_name
        self.undo = undo if undo is not None else SegmentUndoStack()

    def begin(self) -> None:
        segmentation = self.segmentation_node.GetSegmentation()
        existing = self.segment_id and segmentation.GetSegment(self.segment_id) is not None
        self.undo.push(self.segmentation_node, self.segment_id if existing else None, self.volume_node)
        if not existing:
            self.segment_id = add_segment(self.segmentation_node, self.volume_node, self.segment_name)
            self.undo.set_created_id(self.segment_id)

    def write(self, mask: np.ndarray, region: Region) -> None:
        write_mask_region(mask, region, self.volume_node, self.segmentation_node, self.segment_id)

    def end(self) -> None:
        self.undo.record_written()


def plane_region(shape: Sequence[int], voxel_axis: int, index: int) -> Region:
    """Region of one whole slice normal to ``voxel_axis`` (0=I, 1=J, 2=K) of a (K, J, I) volume."""
    k, j, i = (int(v) for v in shape)
    bounds = [0, k - 1, 0, j - 1, 0, i - 1]
    slot = 2 * array_axis(voxel_axis)
    bounds[slot] = bounds[slot + 1] = int(index)
    return tuple(bounds)


def apply_plane(mask: np.ndarray, voxel_axis: int, index: int, plane: np.ndarray) -> None:
    """Write one partial-result plane into the (K, J, I) ``mask``; ``voxel_axis`` is the numpy axis
    of the (K, J, I) array (the service's ``on_update`` convention)."""
    slice_into_volume(mask, voxel_axis_of(int(voxel_axis)), int(index), np.asarray(plane, bool))


def update_region(shape: Sequence[int], voxel_axis: int, index: int) -> Region:
    """Region of the plane :func:`apply_plane` writes (numpy axis ``voxel_axis``)."""
    return plane_region(shape, voxel_axis_of(int(voxel_axis)), index)
