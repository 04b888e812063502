"""The Qt-free prompt controller between Slicer's prompt nodes and the inference service.

:class:`PromptController` observes a box (``vtkMRMLMarkupsROINode``) and positive / negative
click nodes (``vtkMRMLMarkupsFiducialNode``) with VTK observers held on the node objects, or
takes prompts directly from the Segment Editor effect (:meth:`PromptController.submit`). Events
only mark the prompts dirty; :meth:`PromptController.poll` (the widget calls it from a
``QTimer``) reads the prompts, decides whether they are complete and new, sends them to the
runner (the service client), applies the partial 3D results as they arrive and writes the final
mask through a :class:`SegmentWriter`. It never blocks on a 3D job and never raises in normal use:
problems become :attr:`PromptController.status` lines.

Rules, from the events Slicer really sends (see ``docs/slicer.md``):

* an ROI counts only once its placement is complete (the first click defines a one-point box);
* a PointRemoved that leaves the prompts unchanged (a preview point leaving a view) does nothing;
* drags count at their end (PointEndInteraction), never while moving (PointModified);
* a two-click ROI is flattened onto the slice it was drawn in (the first corner's slice), so it
  runs in 2D; ``propagate`` makes it 3D;
* bursts coalesce: the latest prompt wins and runs when the running job ends; a superseded job
  is cancelled and its results are discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import weakref

import numpy as np
import slicer

from ..errors import InputError
from ..prompts import Prompts
from .nodes import (SegmentUndoStack, add_segment, mask_region, markups_to_prompts, slice_view_voxel_slice,
                    union_region, volume_geometry, volume_node_to_image, write_mask_region)

__all__ = ["PromptRunner", "SegmentWriter", "LibrarySegmentWriter", "PromptOptions", "PromptController",
           "drawn_slice", "plane_region"]

Region = tuple[int, int, int, int, int, int]  # (k0, k1, j0, j1, i0, i1), inclusive


class PromptRunner(Protocol):
    """What the controller needs of ``MedFMSegmentLib.service.client.ServiceClient``."""

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


@dataclass
class PromptOptions:
    """How prompts are sent: model / adapter names, slicing axis, 3D strategy, 3D on or off."""

    model: str | None = None
    adapter: str | None = None
    axis: str = "auto"
    box3d_strategy: str | None = None
    propagate: bool = False


@dataclass
class _Request:
    prompts: Prompts
    propagate: bool | None
    axis: Any
    plane: tuple[int, int] | None  # (voxel axis, index) of a 2D prompt

    @property
    def key(self) -> tuple:
        p = self.prompts
        return (p.box, tuple(map(tuple, p.positives)), tuple(map(tuple, p.negatives)), self.propagate, self.axis)


@dataclass
class _Job:
    request: _Request
    job_id: str
    mask: np.ndarray
    since: int = 0
    region: Region | None = None
    begun: bool = False
    superseded: bool = False
    updates: int = 0


@dataclass
class _Observed:
    node: Any
    tags: list[int] = field(default_factory=list)


def plane_region(shape: Sequence[int], voxel_axis: int, index: int) -> Region:
    """Region of one whole slice normal to ``voxel_axis`` (0=I, 1=J, 2=K) of a (K, J, I) volume."""
    k, j, i = (int(v) for v in shape)
    bounds = [0, k - 1, 0, j - 1, 0, i - 1]
    slot = 2 * (2 - voxel_axis)
    bounds[slot] = bounds[slot + 1] = int(index)
    return tuple(bounds)


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


def _flat_axis(box: Sequence[int]) -> int | None:
    flat = [a for a in (2, 1, 0) if box[a] == box[a + 3]]
    return flat[0] if flat else None


_AXIS_NAMES = {"axial": 2, "coronal": 1, "sagittal": 0}


class PromptController:
    """Prompts from markups nodes (or the effect) to the service, results into a segment.

    Args:
        runner: The service client (:class:`PromptRunner`).
        status: Optional callable receiving each status line.
    """

    EVENTS = ("PointPositionDefinedEvent", "PointEndInteractionEvent", "PointRemovedEvent")

    def __init__(self, runner: PromptRunner, status: Callable[[str], None] | None = None) -> None:
        self.runner = runner
        self.options = PromptOptions()
        self.status = ""
        self._status_callback = status
        self.volume_node = None
        self.writer: SegmentWriter | None = None
        self._roi = self._positives = self._negatives = None
        self._observed: list[_Observed] = []
        self._scene = None
        self._scene_tag: int | None = None
        self._first_corner: dict[int, np.ndarray] = {}  # id(roi node) -> first click (world RAS)
        self._view: tuple[int, int] | None = None
        self._dirty = False
        self._force: bool | None = None  # an explicit request: its propagate flag
        self._pending: _Request | None = None
        self._active: _Job | None = None
        self._last_key: tuple | None = None
        self._volume_ids: list[tuple[Any, tuple, str]] = []  # (node, stamp, id); nodes compared by identity
        self.jobs_started = 0

    # ------------------------------------------------------------------ wiring
    def attach(self, volume_node, writer: SegmentWriter, roi=None, positives=None, negatives=None) -> None:
        """Observe these prompt nodes for ``volume_node``; results go to ``writer``.

        Observers are held on the node objects themselves (never looked up by ID, which a scene
        close reuses) and on the scene's StartCloseEvent, which drops them.
        """
        self._drop_observers()
        self.volume_node, self.writer = volume_node, writer
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
        self._last_key = None

    def detach(self) -> None:
        """Drop every observer and cancel the running job (module exit, widget cleanup)."""
        self._drop_observers()
        self._drop_scene_observer()
        self.cancel()
        self.volume_node = self.writer = None
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

    def _on_scene_close(self) -> None:
        self._drop_observers()
        self.cancel()
        self._pending = None
        self._volume_ids.clear()
        self._first_corner.clear()
        self.volume_node = self.writer = None
        self._roi = self._positives = self._negatives = None
        self._set_status("Scene closed.")

    @property
    def observed_nodes(self) -> list:
        """The node objects observed now."""
        return [o.node for o in self._observed]

    def set_view(self, voxel_axis: int | None, index: int | None = None) -> None:
        """The voxel slice the user is looking at (None: unknown or oblique); flattens ROIs not drawn."""
        self._view = None if voxel_axis is None else (int(voxel_axis), int(index))

    def set_view_from_slice_to_ras(self, slice_to_ras) -> None:
        """:meth:`set_view` from a slice view's 4x4 SliceToRAS (oblique views: unknown)."""
        target = slice_view_voxel_slice(self.volume_node, slice_to_ras) if self.volume_node is not None else None
        self.set_view(*(target if target else (None, None)))

    # ------------------------------------------------------------------ events and requests
    def _on_event(self, node, name: str) -> None:
        if node is self._roi and not node.GetControlPointPlacementComplete():
            if name == "PointPositionDefinedEvent" and node.GetNumberOfDefinedControlPoints() == 1:
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(0, position)
                self._first_corner[id(node)] = np.array(position)
            return  # a box is a prompt only once both corners are placed
        if node is self._roi and name == "PointRemovedEvent" and node.GetNumberOfControlPoints() > 0:
            return  # UpdateControlPointsFromBoxROI: a stale box; its PointPositionDefined follows
        self._dirty = True

    def request(self, propagate: bool | None = None) -> None:
        """Segment the current markups prompts now, even if unchanged (the Segment / Propagate buttons)."""
        self._dirty = True
        self._force = bool(propagate) if propagate is not None else self.options.propagate

    def submit(self, prompts: Prompts, plane: tuple[int, int] | None = None, propagate: bool | None = None) -> None:
        """Queue prompts given directly (the Segment Editor effect); ``plane`` is the view's slice."""
        propagate = self.options.propagate if propagate is None else propagate
        self._queue(self._make_request(prompts, plane, propagate), forced=True)

    def _read_markups(self, propagate: bool) -> _Request | None:
        roi = self._roi if self._roi is not None and self._roi.GetScene() is not None else None
        if roi is not None and roi.GetNumberOfControlPoints() > 0 and not roi.GetControlPointPlacementComplete():
            return None  # the box is still being placed
        positives = self._positives if self._positives is not None and self._positives.GetScene() else None
        negatives = self._negatives if self._negatives is not None and self._negatives.GetScene() else None
        try:
            prompts = markups_to_prompts(self.volume_node, roi, positives, negatives)
        except InputError as exc:
            self._set_status(f"{exc}.")
            return None
        plane = None
        if prompts.box is not None and roi is not None and id(roi) in self._first_corner:
            plane = drawn_slice(self.volume_node, self._first_corner[id(roi)], prompts.box)
        return self._make_request(prompts, plane, propagate)

    def _make_request(self, prompts: Prompts, plane, propagate: bool) -> _Request:
        """Flatten a box onto its slice unless 3D is asked for; choose the axis sent."""
        if plane is None and prompts.box is not None:
            flat = _flat_axis(prompts.box)
            if flat is not None:
                plane = (flat, prompts.box[flat])
            elif self._view is not None:
                plane = self._view
            elif self.options.axis in _AXIS_NAMES:
                axis = _AXIS_NAMES[self.options.axis]
                plane = (axis, (prompts.box[axis] + prompts.box[axis + 3]) // 2)
        if prompts.box is None and plane is None and self._view is not None:
            clicks = np.asarray(list(prompts.positives) + list(prompts.negatives), float).reshape(-1, 3)
            if len(clicks) and np.all(np.rint(clicks[:, self._view[0]]) == self._view[1]):
                plane = self._view
        if prompts.box is not None and plane is not None and not propagate:
            box = list(prompts.box)
            box[plane[0]] = box[plane[0] + 3] = int(np.clip(plane[1], box[plane[0]], box[plane[0] + 3]))
            prompts = replace(prompts, box=tuple(box))
        axis = plane[0] if plane is not None else _AXIS_NAMES.get(self.options.axis, "auto")
        return _Request(prompts, True if propagate else None, axis, None if propagate else plane)

    def _queue(self, request: _Request, forced: bool) -> None:
        if request.prompts.is_empty:
            self._set_status("Add a box or a positive click first." if request.prompts.negatives
                             else "No prompt: place a box or a click.")
            return
        try:
            request.prompts.validate(volume_geometry(self.volume_node))
        except InputError as exc:
            self._set_status(f"{exc}.")
            return
        current = self._active.request.key if self._active and not self._active.superseded else self._last_key
        if self._pending is not None:
            current = self._pending.key
        if request.key == current and not forced:
            return  # unchanged prompts (a preview point removed, a no-op drag)
        self._pending = request
        if self._active is not None and not self._active.superseded:
            self._active.superseded = True
            self._call(self.runner.cancel, self._active.job_id)

    # ------------------------------------------------------------------ the poll loop
    @property
    def busy(self) -> bool:
        """True while a job runs or a prompt waits."""
        return self._active is not None or self._pending is not None or self._dirty

    def poll(self) -> None:
        """Read changed prompts, advance the running job, start the next one; never raises."""
        try:
            if self._dirty and self.volume_node is not None:
                self._dirty = False
                forced, self._force = self._force, None
                propagate = self.options.propagate if forced is None else forced
                request = self._read_markups(propagate)
                if request is not None:
                    self._queue(request, forced=forced is not None)
            if self._active is not None:
                self._advance()
            if self._active is None and self._pending is not None:
                request, self._pending = self._pending, None
                self._start(request)
        except Exception as exc:  # noqa: BLE001 - the controller runs from a timer: report, never raise
            self._active = None
            self._set_status(f"Segmentation failed: {_one_line(exc)}")

    def cancel(self) -> None:
        """Cancel the running job (its results are discarded) and any waiting prompt."""
        self._pending = None
        if self._active is not None:
            self._call(self.runner.cancel, self._active.job_id)
            self._active = None
            self._set_status("Cancelled.")

    def _volume_id(self) -> str:
        node = self.volume_node
        stamp = (node.GetImageData().GetMTime(), node.GetMTime())
        for known, known_stamp, volume_id in self._volume_ids:
            if known is node and known_stamp == stamp:
                return volume_id
        image = volume_node_to_image(node)
        volume_id = self.runner.upload_volume(image.array, image.geometry, is_2d=image.array.shape[0] == 1)
        self._volume_ids = [v for v in self._volume_ids if v[0] is not node] + [(node, stamp, volume_id)]
        return volume_id

    def _start(self, request: _Request) -> None:
        if self.volume_node is None or self.writer is None:
            return
        self._last_key = request.key
        options = self.options
        reply = self.runner.prompt(self._volume_id(), request.prompts, axis=request.axis, model=options.model,
                                   adapter=options.adapter, box3d_strategy=options.box3d_strategy,
                                   propagate=request.propagate)
        self.jobs_started += 1
        mask = getattr(reply, "mask", None)
        if mask is not None:
            mask = np.asarray(mask, bool)
            if getattr(reply, "array_axis", None) is not None:
                region = update_region(mask.shape, reply.array_axis, reply.index)
            elif request.plane:
                region = plane_region(mask.shape, *request.plane)
            else:
                region = mask_region(mask)
            if region is not None:
                self.writer.begin()
                self.writer.write(mask, region)
                self.writer.end()
            self._set_status("Segmented the slice." if request.plane else "Segmented.")
            return
        shape = tuple(reversed(self.volume_node.GetImageData().GetDimensions()))
        self._active = _Job(request, reply.job_id, np.zeros(shape, bool))
        self._set_status("Segmenting in 3D...")

    def _write(self, job: _Job, region: Region | None) -> None:
        if region is None:
            return
        if not job.begun:
            self.writer.begin()
            job.begun = True
        self.writer.write(job.mask, region)

    def _advance(self) -> None:
        job = self._active
        state = self.runner.job(job.job_id)
        if not job.superseded:
            job.since, planes = self.runner.updates(job.job_id, job.since)
            region = None
            for voxel_axis, index, plane in planes:
                apply_plane(job.mask, voxel_axis, index, plane)
                region = union_region(region, update_region(job.mask.shape, voxel_axis, index))
                job.updates += 1
            self._write(job, region)
            job.region = union_region(job.region, region)
        if state.state in ("queued", "running"):
            if not job.superseded:
                stage = getattr(state, "stage", "") or "3D"
                self._set_status(f"Segmenting ({stage}): {state.done} of {state.planned}...")
            return
        self._active = None
        if job.superseded:
            return
        if state.state == "done":
            final = np.asarray(self.runner.result(job.job_id), bool)
            job.mask = final
            self._write(job, union_region(job.region, mask_region(final)))
            if job.begun:
                self.writer.end()
            self._set_status("Segmented in 3D.")
        elif state.state == "cancelled":
            self._set_status("Cancelled.")
        else:
            self._set_status(f"Segmentation failed: {getattr(state, 'message', '') or state.state}")

    # ------------------------------------------------------------------ helpers
    def _call(self, function: Callable, *args) -> Any:
        try:
            return function(*args)
        except Exception as exc:  # noqa: BLE001 - a failed cancel must not stop the controller
            self._set_status(f"{_one_line(exc)}")
            return None

    def _set_status(self, text: str) -> None:
        self.status = text
        if self._status_callback is not None:
            self._status_callback(text)


def apply_plane(mask: np.ndarray, voxel_axis: int, index: int, plane: np.ndarray) -> None:
    """Write one partial-result plane into the (K, J, I) ``mask``; ``voxel_axis`` is the numpy axis
    of the (K, J, I) array (the service's ``on_update`` convention)."""
    key: list = [slice(None)] * 3
    key[int(voxel_axis)] = int(index)
    mask[tuple(key)] = np.asarray(plane, bool)


def update_region(shape: Sequence[int], voxel_axis: int, index: int) -> Region:
    """Region of the plane :func:`apply_plane` writes (numpy axis ``voxel_axis``)."""
    return plane_region(shape, 2 - int(voxel_axis), index)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
