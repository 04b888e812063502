"""The Qt-free prompt controller between Slicer's prompt nodes and the inference service.

:class:`PromptController` observes a box (``vtkMRMLMarkupsROINode``) and positive / negative
click nodes (``vtkMRMLMarkupsFiducialNode``) with VTK observers held on the node objects, or
takes prompts directly from the Segment Editor effect (:meth:`PromptController.submit`). Events
only mark the prompts dirty; :meth:`PromptController.poll` (the widget calls it from a
``QTimer``) reads the prompts, decides whether they are complete and new, and runs each as a task
that sends calls through a :class:`~.transport.Transport` (in Slicer, Qt's non-blocking network
access; answers resume the task when they arrive), applies the partial 3D results as they arrive
and writes the final mask through a :class:`SegmentWriter`. Nothing waits on the network and
nothing raises in normal use: problems become :attr:`PromptController.status` lines.

Rules, from the events Slicer really sends (see ``docs/slicer.md``):

* an ROI counts only once its placement is complete (the first click defines a one-point box);
* a PointRemoved that leaves the prompts unchanged (a preview point leaving a view) does nothing;
* a box is read only once the ROI has settled (never the stale box of ``UpdateControlPointsFromBoxROI``);
* drags count at their end (PointEndInteraction), never while moving (PointModified);
* a two-click ROI is flattened onto the slice it was drawn in (the first corner's slice), so it
  runs in 2D; ``propagate`` makes it 3D;
* bursts coalesce: the latest prompt wins and runs when the running one ends; a superseded
  prompt's answer is discarded and its 3D job cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..prompts import Prompts
from .nodes import (mask_region, markups_to_prompts, slice_view_voxel_slice, union_region, volume_geometry,
                    volume_node_to_image, volume_shape)
from .observers import PromptNodeObserver, drawn_slice
from .transport import NEXT_POLL, Call, TaskRunner, Transport, call
from .writing import (LibrarySegmentWriter, PromptRunner, Region, SegmentWriter, apply_plane, plane_region,
                      update_region)

__all__ = ["PromptRunner", "SegmentWriter", "LibrarySegmentWriter", "PromptOptions", "PromptController",
           "drawn_slice", "plane_region", "PromptNodeObserver", "ViewPrompts", "warm_up"]


@dataclass
class PromptOptions:
    """How prompts are sent: model / adapter names, slicing axis, 3D strategy, 3D on or off, and
    whether a changed prompt runs by itself (``auto_update``) or only on :meth:`PromptController.request`."""

    model: str | None = None
    adapter: str | None = None
    axis: str = "auto"
    box3d_strategy: str | None = None
    propagate: bool = False
    auto_update: bool = True


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
    job_id: str | None = None  # set once the service answers with a 3D job
    mask: np.ndarray | None = None
    since: int = 0
    region: Region | None = None  # where the partial results written so far lie
    begun: bool = False
    superseded: bool = False
    updates: int = 0

    def write(self, writer: SegmentWriter, region: Region | None) -> None:
        """Write ``region`` of the job's mask (the first write opens the prompt's undo step)."""
        if region is None:
            return
        if not self.begun:
            writer.begin()
            self.begun = True
        writer.write(self.mask, region)
        self.region = union_region(self.region, region)


class ViewPrompts:
    """Prompts drawn in slice views (the Segment Editor effect), in voxel indices (i, j, k).

    A box replaces the prompt; clicks add to it; a click on another slice starts a new prompt.
    ``plane`` is the ``(voxel axis, index)`` of the view the prompt was drawn in.
    """

    def __init__(self) -> None:
        self.prompts: Prompts | None = None
        self.plane: tuple[int, int] | None = None

    def box(self, corner_a: Sequence[float], corner_b: Sequence[float], plane: tuple[int, int]) -> Prompts:
        """A box from two corners of a drag in a view, flat on that view's slice."""
        lower = np.rint(np.minimum(corner_a, corner_b)).astype(int)
        upper = np.rint(np.maximum(corner_a, corner_b)).astype(int)
        lower[plane[0]] = upper[plane[0]] = plane[1]
        self.prompts, self.plane = Prompts(box=tuple(int(v) for v in (*lower, *upper))), tuple(plane)
        return self.prompts

    def click(self, ijk: Sequence[float], plane: tuple[int, int], negative: bool = False) -> Prompts:
        """Add a positive (or negative) click on the view's slice."""
        point = tuple(float(v) for v in np.rint(np.asarray(ijk, float)))
        if self.prompts is None or self.plane != tuple(plane):
            self.prompts, self.plane = Prompts(), tuple(plane)
        (self.prompts.negatives if negative else self.prompts.positives).append(point)
        return self.prompts

    def clear(self) -> None:
        self.prompts = self.plane = None


def warm_up(runner: PromptRunner, model: str | None = None, adapter: str | None = None) -> str | None:
    """Make the service load its model now, in a job, so no later request waits for the load.

    A prompt answered at once (a 2D prompt, a focus) is a blocking request: the first one would
    wait for the model to load (about 15 s on a CPU). A 3D prompt is a job, answered at once and
    run in the service; this one, on a tiny synthetic volume (no user data), loads the model
    there. Returns the job id (None when the service refused it; the first prompt then loads).
    """
    from ..geometry import VolumeGeometry

    geometry = VolumeGeometry((16, 16, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    volume = np.zeros(geometry.shape, np.float32)
    volume[:, 4:12, 4:12] = 100.0
    try:
        volume_id = runner.upload_volume(volume, geometry)
        reply = runner.prompt(volume_id, Prompts(box=(3, 3, 0, 12, 12, 0)), axis=2, model=model, adapter=adapter,
                              propagate=True)
    except Exception:  # noqa: BLE001 - an optimisation: the first real prompt loads the model instead
        return None
    return getattr(reply, "job_id", None)


def _flat_axis(box: Sequence[int]) -> int | None:
    flat = [a for a in (2, 1, 0) if box[a] == box[a + 3]]
    return flat[0] if flat else None


_AXIS_NAMES = {"axial": 2, "coronal": 1, "sagittal": 0}


def make_request(prompts: Prompts, plane, propagate: bool, view=None, axis_option: str = "auto") -> _Request:
    """The request for ``prompts``: a box flattened onto its slice (the drawn ``plane``, else the
    box's own flat axis, the ``view``, or the ``axis_option``) unless 3D is asked for."""
    if plane is None and prompts.box is not None:
        flat = _flat_axis(prompts.box)
        if flat is not None:
            plane = (flat, prompts.box[flat])
        elif view is not None:
            plane = view
        elif axis_option in _AXIS_NAMES:
            axis = _AXIS_NAMES[axis_option]
            plane = (axis, (prompts.box[axis] + prompts.box[axis + 3]) // 2)
    if prompts.box is None and plane is None and view is not None:
        clicks = np.asarray(list(prompts.positives) + list(prompts.negatives), float).reshape(-1, 3)
        if len(clicks) and np.all(np.rint(clicks[:, view[0]]) == view[1]):
            plane = view
    if prompts.box is not None and plane is not None and not propagate:
        box = list(prompts.box)
        box[plane[0]] = box[plane[0] + 3] = int(np.clip(plane[1], box[plane[0]], box[plane[0] + 3]))
        prompts = replace(prompts, box=tuple(box))
    axis = plane[0] if plane is not None else _AXIS_NAMES.get(axis_option, "auto")
    return _Request(prompts, True if propagate else None, axis, None if propagate else plane)


class PromptController(PromptNodeObserver):
    """Prompts from markups nodes (or the effect) to the service, results into a segment.

    Args:
        transport: How calls reach the service (:mod:`.transport`: the module's Qt transport in
            Slicer, :func:`~.transport.blocking_transport` or a :class:`~.transport.RunnerTransport`).
        status: Optional callable receiving each status line.
    """

    def __init__(self, transport: Transport, status: Callable[[str], None] | None = None) -> None:
        PromptNodeObserver.__init__(self)
        self.transport = transport
        self.tasks = TaskRunner(transport, self._on_task_end, on_late=self._on_late_answer)
        self.options = PromptOptions()
        self.status = ""
        self._status_callback = status
        self.writer: SegmentWriter | None = None
        self._view: tuple[int, int] | None = None
        self._focused: tuple[int, int] | None = None  # the last view sent to the service's focus
        self._force: bool | None = None  # an explicit request: its propagate flag
        self._pending: _Request | None = None
        self._active: _Job | None = None  # the running prompt (None: idle, or a focus running)
        self._last_key: tuple | None = None
        self._volume_ids: list[tuple[Any, tuple, str]] = []  # (node, stamp, id); nodes compared by identity
        self.jobs_started = 0

    # ------------------------------------------------------------------ wiring
    def attach(self, volume_node, writer: SegmentWriter, roi=None, positives=None, negatives=None) -> None:
        """Observe these prompt nodes for ``volume_node``; results go to ``writer``."""
        self.writer = writer
        self.observe(volume_node, roi, positives, negatives)
        self._last_key = None

    def detach(self) -> None:
        """Drop every observer and cancel the running job (module exit, widget cleanup)."""
        self.unobserve()
        self.cancel()
        self.writer = None

    def _on_scene_close(self) -> None:
        PromptNodeObserver._on_scene_close(self)
        self.cancel()
        self._volume_ids.clear()
        self.writer = None
        self._set_status("Scene closed.")

    def set_view(self, voxel_axis: int | None, index: int | None = None) -> None:
        """The voxel slice the user is looking at (None: unknown or oblique); flattens ROIs not drawn,
        and the next idle :meth:`poll` asks the service to embed it ahead of a prompt (``focus``)."""
        self._view = None if voxel_axis is None else (int(voxel_axis), int(index))

    def set_view_from_slice_to_ras(self, slice_to_ras) -> None:
        """:meth:`set_view` from a slice view's 4x4 SliceToRAS (oblique views: unknown)."""
        target = slice_view_voxel_slice(self.volume_node, slice_to_ras) if self.volume_node is not None else None
        self.set_view(*(target if target else (None, None)))

    # ------------------------------------------------------------------ events and requests
    def request(self, propagate: bool | None = None) -> None:
        """Segment the current markups prompts now, even if unchanged (the Segment / Propagate buttons)."""
        self._dirty = True
        self._force = bool(propagate) if propagate is not None else self.options.propagate

    def submit(self, prompts: Prompts, plane: tuple[int, int] | None = None, propagate: bool | None = None) -> None:
        """Queue prompts given directly (the Segment Editor effect); ``plane`` is the view's slice."""
        propagate = self.options.propagate if propagate is None else propagate
        prompts = Prompts(prompts.box, list(prompts.positives), list(prompts.negatives))  # the caller may edit its own
        self._queue(make_request(prompts, plane, propagate, self._view, self.options.axis), forced=True)

    def _read_markups(self, propagate: bool) -> _Request | None:
        roi = self._roi if self._roi is not None and self._roi.GetScene() is not None else None
        if roi is not None and roi.GetNumberOfControlPoints() > 0 and not roi.GetControlPointPlacementComplete():
            return None  # the box is still being placed
        if roi is not None and not self.roi_settled():
            self._dirty = True  # the box is being rewritten (a poll inside its events): read it next poll
            return None
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
        return make_request(prompts, plane, propagate, self._view, self.options.axis)

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
        job = self._active
        if job is not None and not job.superseded:
            job.superseded = True  # its answers are discarded; a 3D job is cancelled
            if job.job_id is not None:
                self._send_quiet(call("cancel", job.job_id))

    # ------------------------------------------------------------------ the poll loop
    @property
    def busy(self) -> bool:
        """True while a prompt runs or waits."""
        return self._active is not None or self._pending is not None or self._dirty

    def poll(self) -> None:
        """Read changed prompts, advance the running job, start the next one; never raises."""
        try:
            if self._dirty and self.volume_node is not None:
                self._dirty = False
                forced, self._force = self._force, None
                propagate = self.options.propagate if forced is None else forced
                request = self._read_markups(propagate) if forced is not None or self.options.auto_update else None
                if request is not None:
                    self._queue(request, forced=forced is not None)
            self.tasks.tick()
            self._next()
        except Exception as exc:  # noqa: BLE001 - the controller runs from a timer: report, never raise
            self.tasks.drop()
            self._active = None
            self._set_status(f"Segmentation failed: {_one_line(exc)}")

    def _next(self) -> None:
        """Start the waiting prompt (a running focus gives way), else embed a newly viewed slice."""
        if self.volume_node is None or self._active is not None:
            return
        if self._pending is not None and self.writer is not None:
            request, self._pending = self._pending, None
            self.tasks.start(self._run(request))
        elif self.tasks.idle and self._view is not None and self._view != self._focused:
            self._focused = self._view
            self.tasks.start(self._focus(self._view))

    def _on_task_end(self, error: BaseException | None) -> None:
        self._active = None
        if error is not None:
            self._set_status(f"Segmentation failed: {_one_line(error)}")
        self._next()

    def _on_late_answer(self, sent: Call, answer: Any) -> None:
        """A dropped prompt's answer: a 3D job it started is cancelled (nothing is written)."""
        if sent.verb == "prompt" and getattr(answer, "job_id", None):
            self._send_quiet(call("cancel", answer.job_id))

    def cancel(self) -> None:
        """Cancel the running job (its results are discarded) and any waiting prompt."""
        self._pending = None
        job, self._active = self._active, None
        self.tasks.drop()
        if job is not None:
            if job.job_id is not None:
                self._send_quiet(call("cancel", job.job_id))
            self._set_status("Cancelled.")

    # ------------------------------------------------------------------ tasks (generators of calls)
    def _upload(self):
        node = self.volume_node
        stamp = (node.GetImageData().GetMTime(), node.GetMTime())
        for known, known_stamp, volume_id in self._volume_ids:
            if known is node and known_stamp == stamp:
                return volume_id
        image = volume_node_to_image(node)
        volume_id = yield call("upload_volume", image.array, image.geometry, is_2d=image.array.shape[0] == 1)
        self._volume_ids = [v for v in self._volume_ids if v[0] is not node] + [(node, stamp, volume_id)]
        return volume_id

    def _focus(self, view: tuple[int, int]):
        """Ask the service to embed the viewed slice (and neighbours) before the user prompts there."""
        options = self.options
        try:
            volume_id = yield from self._upload()
            yield call("focus", volume_id, view[0], view[1], options.model, options.adapter)
        except Exception as exc:  # noqa: BLE001 - an optimisation: a status line, never a failure
            self._set_status(_one_line(exc))

    def _run(self, request: _Request):
        job = self._active = _Job(request)
        writer, options, shape = self.writer, self.options, volume_shape(self.volume_node)
        volume_id = yield from self._upload()
        reply = yield call("prompt", volume_id, request.prompts, axis=request.axis, model=options.model,
                           adapter=options.adapter, box3d_strategy=options.box3d_strategy,
                           propagate=request.propagate)
        self._last_key = request.key  # after the call: a refused prompt runs again when repeated
        self.jobs_started += 1
        if getattr(reply, "mask", None) is not None:
            if not job.superseded:
                write_answer(writer, np.asarray(reply.mask, bool), reply, request.plane)
                self._set_status("Segmented the slice." if request.plane else "Segmented.")
            return
        job.job_id, job.mask = reply.job_id, np.zeros(shape, bool)
        if job.superseded:
            self._send_quiet(call("cancel", job.job_id))
        else:
            self._set_status("Segmenting in 3D...")
        yield from self._follow(job, writer)

    def _follow(self, job: _Job, writer: SegmentWriter):
        """Poll a 3D job once per :meth:`poll`: partial planes go to the segment as they arrive."""
        while True:
            yield NEXT_POLL
            state = yield call("job", job.job_id)
            if not job.superseded:
                job.since, planes = yield call("updates", job.job_id, job.since)
                region = None
                for voxel_axis, index, plane in planes if not job.superseded else ():
                    apply_plane(job.mask, voxel_axis, index, plane)
                    region = union_region(region, update_region(job.mask.shape, voxel_axis, index))
                    job.updates += 1
                job.write(writer, region)
            if state.state not in ("queued", "running"):
                break
            if not job.superseded:
                self._set_status(f"Segmenting ({getattr(state, 'stage', '') or '3D'}): {state.done} of {state.planned}...")
        if job.superseded:
            return
        if state.state == "done":
            job.mask = np.asarray((yield call("result", job.job_id)), bool)
            job.write(writer, union_region(job.region, mask_region(job.mask)))  # clears stale partial planes
            if job.begun:
                writer.end()
            self._set_status("Segmented in 3D.")
        elif state.state == "cancelled":
            self._set_status("Cancelled.")
        else:
            self._set_status(f"Segmentation failed: {getattr(state, 'message', '') or state.state}")

    # ------------------------------------------------------------------ helpers
    def _send_quiet(self, sent: Call) -> None:
        """Send a call outside the running task (a cancel); a failure becomes the status line."""
        self.transport.send(sent, self._quiet_answer)

    def _quiet_answer(self, result: Any, error: BaseException | None) -> None:
        if error is not None:
            self._set_status(_one_line(error))

    def _set_status(self, text: str) -> None:
        self.status = text
        if self._status_callback is not None:
            self._status_callback(text)


def write_answer(writer: SegmentWriter, mask: np.ndarray, reply: Any, plane: tuple[int, int] | None) -> None:
    """Write a prompt answered at once: its slice (or the drawn plane, or the mask's bounds), one undo step."""
    if getattr(reply, "array_axis", None) is not None:
        region = update_region(mask.shape, reply.array_axis, reply.index)
    elif plane:
        region = plane_region(mask.shape, *plane)
    else:
        region = mask_region(mask)
    if region is not None:
        writer.begin()
        writer.write(mask, region)
        writer.end()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
