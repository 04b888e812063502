"""The prompt controller (``slicer_bridge.interaction``) on real MRML (slicer-core), replaying the
event sequences Slicer's markups widgets send.

These tests check the controller's decisions (when a prompt is complete, 2D vs 3D, coalescing,
partial results, writes, observers, scene leaks). The runner here is :class:`BoxFillingRunner`,
a stand-in for the service that fills the prompt's box, so the prompts sent can be inspected;
``test_slicer_service.py`` drives the same controller against a real service and LiteMedSAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="MRML classes (pip package slicer-core) are not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes (install slicer-core)", allow_module_level=True)
import vtk  # noqa: E402

from MedFMSegmentLib import slicer_bridge as bridge  # noqa: E402
from MedFMSegmentLib.geometry import VolumeGeometry  # noqa: E402
from MedFMSegmentLib.io import MedicalImage  # noqa: E402
from MedFMSegmentLib.slicer_bridge.interaction import (LibrarySegmentWriter, PromptController,  # noqa: E402
                                                        ViewPrompts, drawn_slice)
from MedFMSegmentLib.slicer_bridge.transport import RunnerTransport  # noqa: E402

M = slicer.vtkMRMLMarkupsNode


@dataclass
class _Reply:
    mask: np.ndarray | None = None
    job_id: str | None = None


@dataclass
class _Status:
    state: str
    done: int = 0
    planned: int = 1
    stage: str = "propagate"
    message: str = ""


@dataclass
class BoxFillingRunner:
    """Stand-in for the service: records each prompt; a flat box (or clicks) answers at once with
    the box (or a 3x3 square around the first click) filled; a 3D box starts a job that the test
    advances with :meth:`emit` / :meth:`finish`."""

    shape: tuple = ()
    prompts: list = field(default_factory=list)
    uploads: int = 0
    jobs: dict = field(default_factory=dict)
    cancelled: list = field(default_factory=list)
    focused: list = field(default_factory=list)

    def upload_volume(self, array_kji, geometry, is_2d=False):
        self.shape = array_kji.shape
        self.uploads += 1
        return "vol"

    @staticmethod
    def _fill(shape, box):
        mask = np.zeros(shape, bool)
        i0, j0, k0, i1, j1, k1 = box
        mask[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = True
        return mask

    def prompt(self, volume_id, prompts, *, axis="auto", model=None, adapter=None, box3d_strategy=None,
               propagate=None):
        self.prompts.append((prompts, axis, propagate, adapter))
        box = prompts.box
        if box is None:
            i, j, k = (int(v) for v in prompts.positives[0])
            box = (i - 1, j - 1, k, i + 1, j + 1, k)
        if propagate or min(box[3 + a] - box[a] for a in range(3)) > 0:
            job_id = f"job{len(self.jobs)}"
            self.jobs[job_id] = {"state": "running", "planes": [], "result": self._fill(self.shape, box)}
            return _Reply(job_id=job_id)
        return _Reply(mask=self._fill(self.shape, box))

    def focus(self, volume_id, axis, index, model=None, adapter=None):
        self.focused.append((axis, index, adapter))

    def emit(self, job_id, k):
        """The job finished slice ``k`` (numpy axis 0 of the result)."""
        self.jobs[job_id]["planes"].append((0, k, self.jobs[job_id]["result"][k]))

    def finish(self, job_id, state="done"):
        self.jobs[job_id]["state"] = state

    def job(self, job_id):
        return _Status(self.jobs[job_id]["state"], len(self.jobs[job_id]["planes"]))

    def updates(self, job_id, since=0):
        planes = self.jobs[job_id]["planes"]
        return len(planes), planes[since:]

    def result(self, job_id):
        return self.jobs[job_id]["result"]

    def cancel(self, job_id):
        """A cancel request; the job ends at its next slice (the test calls ``finish``)."""
        self.cancelled.append(job_id)


# ---------------------------------------------------------------------------- fixtures
SHAPE = (12, 30, 40)  # (K, J, I)


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture()
def volume(scene):
    geometry = VolumeGeometry((SHAPE[2], SHAPE[1], SHAPE[0]), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    image = MedicalImage(np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32), geometry)
    return bridge.image_to_volume_node(image, scene, "V")


@pytest.fixture()
def setup(scene, volume):
    runner = BoxFillingRunner()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    positives = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Plus")
    negatives = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Minus")
    controller = PromptController(RunnerTransport(runner))
    writer = LibrarySegmentWriter(volume, segmentation)
    controller.attach(volume, writer, roi, positives, negatives)
    yield controller, runner, writer, roi, positives, negatives
    controller.detach()


def ras(volume, i, j, k):
    return bridge.volume_geometry(volume).index_to_ras(np.array([[i, j, k]], float))[0]


def place_roi(roi, volume, corner_a, corner_b):
    """Two clicks in place mode: each adds a defined control point (the second one makes
    vtkMRMLMarkupsROINode replace both points by its centre, UpdateControlPointsFromBoxROI)."""
    roi.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, *corner_a)))
    yield "first"
    roi.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, *corner_b)))
    yield "second"


def segment_mask(writer, volume):
    return bridge.segment_to_mask(writer.segmentation_node, writer.segment_id, volume)


# ---------------------------------------------------------------------------- ROI placement
def test_two_click_roi_runs_once_in_2d_on_the_drawn_slice(setup, volume):
    controller, runner, writer, roi, *_ = setup
    removed = []
    tag = roi.AddObserver(M.PointRemovedEvent, lambda caller, event: removed.append(caller.GetSize()))
    steps = place_roi(roi, volume, (5, 6, 4), (25, 20, 4))
    next(steps)
    controller.poll()
    assert runner.prompts == [], "the first click (a one-point box) must not run"
    next(steps)
    roi.RemoveObserver(tag)
    assert removed, "vtkMRMLMarkupsROINode no longer replaces the two points (PointRemovedEvent)"
    controller.poll()
    controller.poll()
    assert len(runner.prompts) == 1
    prompts, axis, propagate, _ = runner.prompts[0]
    assert prompts.box == (5, 6, 4, 25, 20, 4), "flat on the axial slice it was drawn on"
    assert axis == 2 and propagate is None
    mask = segment_mask(writer, volume)
    assert mask[4].sum() == 21 * 15 and mask.sum() == 21 * 15


def test_two_click_roi_has_thickness_yet_the_drawn_view_decides(setup, volume):
    controller, runner, _, roi, *_ = setup
    for _step in place_roi(roi, volume, (5, 10, 2), (25, 10, 9)):  # drawn in a coronal view (J = 10)
        pass
    i0, j0, k0, i1, j1, k1 = bridge.roi_to_box(volume, roi)
    assert j1 > j0, "two-click ROIs are given a thickness (the shortest side)"
    controller.poll()
    assert len(runner.prompts) == 1
    prompts, axis, _, _ = runner.prompts[0]
    assert axis == 1 and prompts.box[1] == prompts.box[4] == 10


def test_poll_inside_the_point_removed_event_never_sends_a_stale_box(setup, volume):
    controller, runner, _, roi, *_ = setup
    tag = roi.AddObserver(M.PointRemovedEvent, lambda caller, event: controller.poll())
    for _step in place_roi(roi, volume, (5, 6, 4), (25, 20, 4)):
        controller.poll()
    roi.RemoveObserver(tag)
    controller.poll()
    assert [p.box for p, *_ in runner.prompts] == [(5, 6, 4, 25, 20, 4)]


def test_a_placement_runs_even_when_the_trailing_point_defined_event_never_arrives(setup, volume):
    """After UpdateControlPointsFromBoxROI's PointRemoved (a stale box), Slicer normally sends a
    PointPositionDefined; the placement must run without it (it has been seen not to arrive)."""
    controller, runner, _, roi, *_ = setup
    steps = place_roi(roi, volume, (5, 6, 4), (25, 20, 4))
    next(steps)
    observed = next(o for o in controller._observed if o.node is roi)
    defined = observed.tags[controller.EVENTS.index("PointPositionDefinedEvent")]
    roi.RemoveObserver(defined)  # from now on the controller sees only the PointRemoved
    next(steps)
    controller.poll()
    assert [p.box for p, *_ in runner.prompts] == [(5, 6, 4, 25, 20, 4)]


def test_a_point_deleted_from_a_finished_roi_reads_the_roi_at_the_next_polls(setup, volume):
    """A PointRemoved that leaves points, with no later change to the ROI, is not a placement:
    the controller waits one poll for the box to settle, then reads it (it never stays busy)."""
    controller, runner, _, roi, *_ = setup
    for _step in place_roi(roi, volume, (5, 6, 4), (25, 20, 4)):
        pass
    controller.poll()
    assert len(runner.prompts) == 1
    roi.InvokeEvent(M.PointRemovedEvent)
    controller.poll()
    controller.poll()
    assert not controller.busy and len(runner.prompts) == 1, "unchanged box: no second run"


def test_propagate_sends_the_whole_roi_in_3d_and_drawn_slice_helper(setup, volume):
    controller, runner, _, roi, *_ = setup
    for _step in place_roi(roi, volume, (5, 6, 4), (25, 20, 4)):
        pass
    controller.request(propagate=True)
    controller.poll()
    prompts, _, propagate, _ = runner.prompts[-1]
    assert propagate is True and prompts.box == bridge.roi_to_box(volume, roi)
    assert drawn_slice(volume, ras(volume, 5, 6, 4), prompts.box) == (2, 4)


def test_roi_handle_drag_counts_at_its_end_only(setup, volume):
    controller, runner, _, roi, *_ = setup
    for _step in place_roi(roi, volume, (5, 6, 4), (25, 20, 4)):
        pass
    controller.poll()
    size = list(roi.GetSize())
    for step in range(3):  # dragging a handle: PointModified while moving
        size[0] += 2.0
        roi.SetSize(*size)
        roi.InvokeEvent(M.PointModifiedEvent)
        controller.poll()
    assert len(runner.prompts) == 1
    roi.InvokeEvent(M.PointEndInteractionEvent)
    controller.poll()
    assert len(runner.prompts) == 2 and runner.prompts[1][0].box[3] > runner.prompts[0][0].box[3]


# ---------------------------------------------------------------------------- clicks
def add_preview(node, volume, ijk):
    """The preview point that follows the mouse in place mode (status PositionPreview)."""
    n = node.AddControlPoint(vtk.vtkVector3d(0, 0, 0), "")
    node.SetNthControlPointPositionWorld(n, list(ras(volume, *ijk)), node.PositionPreview)
    return n


def test_preview_points_never_run_and_leaving_a_view_does_nothing(setup, volume):
    controller, runner, _, _, positives, _ = setup
    n = add_preview(positives, volume, (10, 10, 3))  # the mouse enters a view in place mode
    controller.poll()
    assert runner.prompts == []
    positives.SetNthControlPointPositionWorld(n, list(ras(volume, 10, 10, 3)), positives.PositionDefined)  # click
    controller.poll()
    assert len(runner.prompts) == 1
    n = add_preview(positives, volume, (14, 12, 3))  # next preview point, then the mouse leaves
    positives.RemoveNthControlPoint(n)
    controller.poll()
    assert len(runner.prompts) == 1, "a PointRemoved with unchanged prompts must not re-run"


def test_normal_use_gives_status_lines_not_errors(setup, volume):
    controller, runner, _, _, positives, negatives = setup
    negatives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 10, 10, 3)))  # a negative point first
    controller.poll()
    assert runner.prompts == [] and "positive" in controller.status
    positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 400, 10, 3)))  # outside the volume
    controller.poll()
    assert runner.prompts == [] and "outside" in controller.status
    positives.RemoveAllControlPoints()
    negatives.RemoveAllControlPoints()
    positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 10, 10, 3)))
    controller.poll()
    assert len(runner.prompts) == 1
    positives.RemoveNthControlPoint(0)  # the last point deleted
    controller.poll()
    assert len(runner.prompts) == 1 and "No prompt" in controller.status


def test_clicks_follow_the_adapter_option(setup, volume):
    controller, runner, *_ = setup
    positives = setup[4]
    controller.options.adapter = "hippocampus"
    positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 10, 10, 3)))
    controller.poll()
    assert runner.prompts[0][3] == "hippocampus"


# ---------------------------------------------------------------------------- jobs
def start_3d_box(controller, roi, volume):
    controller.options.propagate = True
    for _step in place_roi(roi, volume, (5, 6, 4), (25, 20, 4)):
        pass
    controller.poll()


def test_bursts_coalesce_the_latest_wins_and_superseded_results_are_dropped(setup, volume):
    controller, runner, writer, roi, *_ = setup
    start_3d_box(controller, roi, volume)
    assert list(runner.jobs) == ["job0"]
    runner.emit("job0", 4)
    controller.poll()
    assert segment_mask(writer, volume)[4].any(), "a partial 3D result shows at once"
    for width in (30.0, 34.0):  # two more edits while job0 runs
        roi.SetSize(width, *roi.GetSize()[1:])
        roi.InvokeEvent(M.PointEndInteractionEvent)
        controller.poll()
    assert runner.cancelled == ["job0"] and list(runner.jobs) == ["job0"], "one job at a time"
    runner.emit("job0", 5)  # late results of the superseded job are never written
    controller.poll()
    assert list(runner.jobs) == ["job0"]
    runner.finish("job0", "cancelled")
    controller.poll()
    assert list(runner.jobs) == ["job0", "job1"], "the latest prompt runs once the previous ended"
    assert not segment_mask(writer, volume)[5].any()
    assert runner.prompts[-1][0].box == bridge.roi_to_box(volume, roi)
    for k in range(12):
        runner.emit("job1", k)
        if k == 6:
            controller.poll()
            grown = segment_mask(writer, volume)
            assert grown[:7].any() and not grown[8:].any(), "3D result grows as slices arrive"
    runner.finish("job1")
    controller.poll()
    assert np.array_equal(segment_mask(writer, volume), runner.result("job1"))
    assert not controller.busy and "3D" in controller.status


def test_cancel_stops_the_job_and_keeps_what_was_shown(setup, volume):
    controller, runner, writer, roi, *_ = setup
    start_3d_box(controller, roi, volume)
    runner.emit("job0", 4)
    controller.poll()
    controller.cancel()
    assert runner.cancelled == ["job0"] and not controller.busy and controller.status == "Cancelled."
    runner.emit("job0", 5)
    controller.poll()
    assert not segment_mask(writer, volume)[5].any()


# ---------------------------------------------------------------------------- observers and scene
def observed_events(node):
    return [node.HasObserver(getattr(M, name)) for name in PromptController.EVENTS]


def test_observers_are_dropped_on_scene_close_and_on_detach(scene, volume, setup):
    controller, runner, _, roi, positives, negatives = setup
    assert all(observed_events(roi))
    scene.Clear()
    assert not any(observed_events(roi) + observed_events(positives)), "observers outlive the scene close"
    assert controller.observed_nodes == []
    # IDs are reused after Clear(): new nodes with the old IDs must not be mistaken for the old ones.
    new_roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    assert not any(observed_events(new_roi))
    controller.poll()
    assert runner.prompts == []
    # Re-attached to the new nodes, detach() (module exit) drops everything.
    new_volume = bridge.image_to_volume_node(bridge.volume_node_to_image(volume), scene, "V2") \
        if volume.GetImageData() else None
    controller.attach(new_volume, LibrarySegmentWriter(new_volume, scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode")), new_roi)
    assert all(observed_events(new_roi))
    controller.detach()
    assert not any(observed_events(new_roi))


def test_after_n_prompts_the_scene_holds_no_new_nodes(scene, setup, volume):
    controller, runner, writer, roi, positives, _ = setup
    positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 10, 10, 3)))
    controller.poll()
    assert len(runner.prompts) == 1
    nodes_after_first = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    for n in range(5):
        positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 12 + n, 11, 3)))
        controller.poll()
        writer.undo.undo()
        controller.request()
        controller.poll()
    assert len(runner.prompts) == 11
    assert {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())} == nodes_after_first


# ---------------------------------------------------------------------------- writes and undo
def test_region_write_changes_only_the_region_and_labelmap_matches(scene, volume):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    rng = np.random.default_rng(1)
    before = rng.random(SHAPE) > 0.6
    segment_id = bridge.mask_to_segment(before, volume, segmentation)
    other = bridge.mask_to_segment(rng.random(SHAPE) > 0.5, volume, segmentation, segment_name="other")
    other_before = bridge.segment_to_mask(segmentation, other, volume)
    new = rng.random(SHAPE) > 0.3
    region = (3, 5, 2, 20, 4, 30)
    bridge.write_mask_region(new, region, volume, segmentation, segment_id)
    expected = before.copy()
    expected[3:6, 2:21, 4:31] = new[3:6, 2:21, 4:31]
    assert np.array_equal(bridge.segment_to_mask(segmentation, segment_id, volume), expected)
    assert np.array_equal(bridge.segment_to_mask(segmentation, other, volume), other_before)
    labelmap = bridge.labelmap_from_mask(new, volume, segmentation, region)
    assert labelmap.GetExtent() == (4, 30, 2, 20, 3, 5)
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(3, 19, 27)
    assert np.array_equal(values > 0, new[3:6, 2:21, 4:31])


def test_undo_restores_an_ai_edit_but_never_discards_a_manual_edit(setup, volume):
    controller, runner, writer, _, positives, _ = setup
    positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 10, 10, 3)))
    controller.poll()
    first = segment_mask(writer, volume)
    positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 20, 10, 3)))
    positives.RemoveNthControlPoint(0)
    controller.poll()
    assert not np.array_equal(segment_mask(writer, volume), first)
    writer.undo.undo()
    assert np.array_equal(segment_mask(writer, volume), first)
    manual = first.copy()
    manual[8, 5, 5] = True  # a manual edit after the AI edit
    bridge.mask_to_segment(manual, volume, writer.segmentation_node, writer.segment_id)
    from MedFMSegmentLib.errors import InputError

    with pytest.raises(InputError, match="Segment Editor"):
        writer.undo.undo()
    assert np.array_equal(segment_mask(writer, volume), manual)


def test_the_viewed_slice_is_embedded_ahead_once_per_view_and_never_during_a_job(setup, volume):
    controller, runner, _, roi, *_ = setup
    controller.options.adapter = "hippo"
    controller.set_view_from_slice_to_ras(slice_to_ras(volume, k=5))
    controller.poll()
    controller.poll()
    assert runner.focused == [(2, 5, "hippo")] and runner.uploads == 1
    start_3d_box(controller, roi, volume)
    controller.set_view(2, 7)
    controller.poll()
    assert list(runner.jobs) == ["job0"], controller.status
    assert runner.focused == [(2, 5, "hippo")], "no focus while a job runs"
    runner.finish("job0")
    controller.poll()
    controller.poll()
    assert runner.focused[-1] == (2, 7, "hippo")


def slice_to_ras(volume, k):
    """An axial view's SliceToRAS resting on slice ``k``."""
    matrix = np.eye(4)
    matrix[:3, 3] = ras(volume, 10, 10, k)
    return matrix


def test_view_prompts_of_the_effect_box_then_clicks_then_another_slice(setup, volume):
    controller, runner, writer, *_ = setup
    view = ViewPrompts()
    controller.submit(view.box((25.4, 20.2, 3.6), (5.1, 6.0, 4.4), (2, 4)), plane=view.plane)
    controller.poll()
    assert runner.prompts[-1][0].box == (5, 6, 4, 25, 20, 4) and runner.prompts[-1][1] == 2
    controller.submit(view.click((12.2, 9.7, 4.0), (2, 4), negative=True), plane=view.plane)
    controller.poll()
    sent = runner.prompts[-1][0]
    assert sent.box == (5, 6, 4, 25, 20, 4) and sent.negatives == [(12.0, 10.0, 4.0)]
    prompts = view.click((8, 8, 7), (2, 7))
    assert prompts.box is None and prompts.positives == [(8.0, 8.0, 7.0)] and view.plane == (2, 7)
    controller.submit(view.click((9, 8, 7), (2, 7)), plane=view.plane)
    view.click((10, 8, 7), (2, 7))  # the effect edits its prompts after submitting: the queued copy stays
    controller.poll()
    assert runner.prompts[-1][0].positives == [(8.0, 8.0, 7.0), (9.0, 8.0, 7.0)]
    mask = segment_mask(writer, volume)
    assert mask[4].any() and mask[7].any(), "each slice keeps its own result"


def test_without_auto_update_prompts_run_only_on_request(setup, volume):
    controller, runner, _, roi, *_ = setup
    controller.options.auto_update = False
    for _step in place_roi(roi, volume, (5, 6, 4), (25, 20, 4)):
        controller.poll()
    controller.poll()
    assert runner.prompts == []
    controller.request(propagate=False)
    controller.poll()
    assert [p.box for p, *_ in runner.prompts] == [(5, 6, 4, 25, 20, 4)]


def test_a_refused_prompt_is_a_status_line_and_runs_again_when_repeated(setup, volume):
    controller, runner, _, _, positives, _ = setup

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    working, runner.prompt = runner.prompt, refuse
    positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 10, 10, 3)))
    controller.poll()
    assert controller.status == "Segmentation failed: [Errno 111] Connection refused" and not controller.busy
    runner.prompt = working
    positives.InvokeEvent(M.PointEndInteractionEvent)  # the same click, nudged back where it was
    controller.poll()
    assert len(runner.prompts) == 1


class DeferredTransport(RunnerTransport):
    """Answers each call only when the test delivers it, as Qt's event loop delivers the module's
    network answers: later, while the controller keeps polling."""

    def __init__(self, runner) -> None:
        super().__init__(runner)
        self.queue = []

    def send(self, call, done) -> None:
        self.queue.append((call, done))

    def deliver(self):
        call, done = self.queue.pop(0)
        RunnerTransport.send(self, call, done)
        return call

    @property
    def verbs(self) -> list[str]:
        return [call.verb for call, _ in self.queue]


def test_answers_arriving_later_a_focus_gives_way_and_late_answers_are_ignored(scene, volume):
    runner = BoxFillingRunner()
    transport = DeferredTransport(runner)
    controller = PromptController(transport)
    writer = LibrarySegmentWriter(volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S"))
    positives = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Plus")
    controller.attach(volume, writer, None, positives)
    controller.set_view(2, 3)
    controller.poll()
    assert transport.verbs == ["upload_volume"] and not controller.busy, "a focus is not a prompt"
    positives.AddControlPointWorld(vtk.vtkVector3d(*ras(volume, 10, 10, 3)))
    controller.poll()
    assert transport.verbs == ["upload_volume", "upload_volume"] and controller.busy, "the prompt does not wait"
    transport.deliver()  # the dropped focus's answer
    assert transport.verbs == ["upload_volume"] and runner.focused == []
    controller.poll()
    assert transport.verbs == ["upload_volume"], "one call in flight at a time"
    transport.deliver()
    assert transport.verbs == ["prompt"]
    transport.deliver()
    assert not controller.busy and len(runner.prompts) == 1 and segment_mask(writer, volume)[3].sum() == 9
    controller.detach()
