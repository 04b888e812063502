"""VTK observers on the prompt nodes: when a markups change makes a prompt worth reading.

Events only mark the prompts dirty (the controller reads them at its next poll), following what
Slicer's markups widgets really send:

* an ROI counts only once its placement is complete (the first click defines a one-point box);
  the first click's position is kept, to find the slice the box was drawn on (:func:`drawn_slice`);
* the PointRemoved of ``UpdateControlPointsFromBoxROI`` comes while the box is stale (its new
  size around its old centre): it marks the prompts dirty but records the ROI's modified time, and
  the box is read only once the ROI has been modified since (:meth:`PromptNodeObserver.roi_settled`).
  The PointPositionDefined that normally follows is not relied on: it does not always reach the
  observer, and a placement must never be lost;
* drags count at their end (PointEndInteraction), never while moving (PointModified).

Observers are held on node objects with weak references to their owner, and dropped on the
scene's StartCloseEvent (node IDs are reused after a close) and by :meth:`PromptNodeObserver.unobserve`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import slicer

from .nodes import volume_geometry

__all__ = ["PromptNodeObserver", "drawn_slice"]


@dataclass
class _Observed:
    node: Any
    tags: list[int] = field(default_factory=list)


def drawn_slice(volume_node, first_corner_ras: Sequence[float], box: Sequence[int]) -> tuple[int, int] | None:
    """``(voxel_axis, index)`` of the slice a two-click ROI was drawn on, or None.

    The first click's corner lies on the drawing plane; ``vtkMRMLMarkupsROINode`` centres the box's
    third side (the "thickness" it adds) on that plane. So the drawn axis is the one along which the
    corner sits at the box's centre; on the two in-plane axes it sits on a face.
    """
    ijk = volume_geometry(volume_node).ras_to_index(np.asarray(first_corner_ras, float).reshape(1, 3))[0]
    lower, upper = np.asarray(box[:3], float), np.asarray(box[3:], float)
    centred = [a for a in range(3) if abs(ijk[a] - (lower[a] + upper[a]) / 2.0) <= 0.5 and upper[a] > lower[a]]
    on_face = [a for a in range(3) if min(abs(ijk[a] - lower[a]), abs(ijk[a] - upper[a])) <= 0.5]
    candidates = [a for a in centred if all(b in on_face for b in range(3) if b != a)]
    if len(candidates) != 1:
        return None
    axis = candidates[0]
    return axis, int(np.clip(np.floor(ijk[axis] + 0.5), lower[axis], upper[axis]))


class PromptNodeObserver:
    """Observes one ROI and two fiducial nodes; sets ``_dirty`` when the prompts may have changed."""

    EVENTS = ("PointPositionDefinedEvent", "PointEndInteractionEvent", "PointRemovedEvent")

    def __init__(self) -> None:
        self.volume_node = None
        self._roi = self._positives = self._negatives = None
        self._observed: list[_Observed] = []
        self._scene = None
        self._scene_tag: int | None = None
        self._first_corner: dict[int, np.ndarray] = {}  # id(roi node) -> first click (world RAS)
        self._stale_roi_mtime: int | None = None  # the ROI's MTime when its box was last seen stale
        self._stale_asked = False
        self._dirty = False

    def observe(self, volume_node, roi=None, positives=None, negatives=None) -> None:
        """Observe these prompt nodes (any may be None) for ``volume_node``.

        Observers are held on the node objects themselves (never looked up by ID, which a scene
        close reuses) and on the scene's StartCloseEvent, which drops them.
        """
        self._drop_observers()
        self.volume_node = volume_node
        self._roi, self._positives, self._negatives = roi, positives, negatives
        for node in (roi, positives, negatives):
            if node is None:
                continue
            observed = _Observed(node)
            for name in self.EVENTS:
                event = getattr(slicer.vtkMRMLMarkupsNode, name)
                observed.tags.append(node.AddObserver(event, self._callback(name)))
            self._observed.append(observed)
        scene = volume_node.GetScene() if volume_node is not None else None
        if scene is not None and scene is not self._scene:
            self._drop_scene_observer()
            self._scene = scene
            self._scene_tag = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self._callback("StartCloseEvent"))

    def unobserve(self) -> None:
        """Drop every node and scene observer."""
        self._drop_observers()
        self._drop_scene_observer()
        self._dirty = False
        self._stale_roi_mtime = None
        self.volume_node = None
        self._roi = self._positives = self._negatives = None

    def _callback(self, name: str) -> Callable:
        # A weak reference: observers on nodes and the scene must not keep the controller alive
        # (nor form a cycle whose collection runs scene-close callbacks on a half-freed object).
        owner = weakref.ref(self)

        def on_event(caller, event) -> None:
            controller = owner()
            if controller is not None:
                if name == "StartCloseEvent":
                    controller._on_scene_close()
                else:
                    controller._on_event(caller, name)
        return on_event

    def _drop_observers(self) -> None:
        for observed in self._observed:
            for tag in observed.tags:
                observed.node.RemoveObserver(tag)
        self._observed = []

    def _drop_scene_observer(self) -> None:
        if self._scene is not None and self._scene_tag is not None:
            self._scene.RemoveObserver(self._scene_tag)
        self._scene = self._scene_tag = None

    @property
    def observed_nodes(self) -> list:
        """The node objects observed now."""
        return [o.node for o in self._observed]

    def _on_event(self, node, name: str) -> None:
        if node is self._roi and not node.GetControlPointPlacementComplete():
            if name == "PointPositionDefinedEvent" and node.GetNumberOfDefinedControlPoints() == 1:
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(0, position)
                self._first_corner[id(node)] = np.array(position)
            return  # a box is a prompt only once both corners are placed
        if node is self._roi and name == "PointRemovedEvent" and node.GetNumberOfControlPoints() > 0:
            # UpdateControlPointsFromBoxROI: the box is stale now
            self._stale_roi_mtime, self._stale_asked = node.GetMTime(), False
        self._dirty = True

    def roi_settled(self) -> bool:
        """False while the ROI's box is stale: it has not been modified since the PointRemoved of
        ``UpdateControlPointsFromBoxROI`` (its centre is updated after that event).

        Asked once more with the ROI still unmodified, it answers True: that PointRemoved was a
        point deleted from a finished ROI, not the middle of a placement.
        """
        roi = self._roi
        if self._stale_roi_mtime is None or roi is None:
            return True
        if roi.GetMTime() == self._stale_roi_mtime and not self._stale_asked:
            self._stale_asked = True
            return False
        self._stale_roi_mtime, self._stale_asked = None, False
        return True

    def _on_scene_close(self) -> None:
        """The scene is closing: drop the node observers (subclasses also stop their work)."""
        self._drop_observers()
        self._first_corner.clear()
        self._stale_roi_mtime = None
        self._dirty = False
        self.volume_node = None
        self._roi = self._positives = self._negatives = None
