"""The prompt controller against a real ``medfmsegment serve`` on 127.0.0.1 with the real LiteMedSAM,
on real MRML (slicer-core) and a real hippocampus MRI: what the user gets in the segment is what
the library computes in process."""

from __future__ import annotations

import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="MRML classes (pip package slicer-core) are not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes (install slicer-core)", allow_module_level=True)
pytest.importorskip("fastapi", reason="the service needs fastapi and uvicorn")
import vtk  # noqa: E402

from test_service import in_process, label_box, start_server, stop_server  # noqa: E402

from MedFMSegmentLib import slicer_bridge as bridge  # noqa: E402
from MedFMSegmentLib.io import read_image, read_label  # noqa: E402
from MedFMSegmentLib.service.client import ServiceClient  # noqa: E402
from MedFMSegmentLib.slicer_bridge.interaction import LibrarySegmentWriter, PromptController, warm_up  # noqa: E402
from MedFMSegmentLib.slicer_bridge.transport import BlockingExchange, HttpTransport, blocking_transport  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slicer_service")
    process, ready = start_server(tmp)
    yield ServiceClient(ready["url"], open(ready["token_file"]).read().strip(), timeout=300)
    assert stop_server(process) == 0


def test_warm_up_is_a_job_on_synthetic_data_that_ends_done(client):
    """Run first in this module (a fresh service): the model loads in a job, not in a blocking request."""
    job_id = warm_up(client)
    assert job_id
    end = time.monotonic() + 300
    while client.job(job_id).state in ("queued", "running") and time.monotonic() < end:
        time.sleep(0.2)
    assert client.job(job_id).state == "done" and client.result(job_id).shape == (2, 16, 16)


@pytest.fixture(scope="module")
def hippo(data_dir):
    name = "hippocampus_001.nii.gz"
    image = read_image(data_dir / "msd_hippocampus_mri" / "imagesTr" / name)
    return image, read_label(data_dir / "msd_hippocampus_mri" / "labelsTr" / name).array > 0


@pytest.fixture()
def scene_setup(client, hippo):
    image, label = hippo
    scene = slicer.vtkMRMLScene()
    volume = bridge.image_to_volume_node(image, scene, "hippocampus")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    positives = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Plus")
    writer = LibrarySegmentWriter(volume, segmentation)
    controller = PromptController(blocking_transport(client))  # the HTTP the module's Qt transport sends
    controller.attach(volume, writer, roi, positives)
    yield scene, volume, writer, roi, positives, controller
    controller.detach()


def world(volume, ijk):
    return vtk.vtkVector3d(*bridge.volume_geometry(volume).index_to_ras(np.array([ijk], float))[0])


def poll_until_idle(controller, timeout_s: float = 600.0, each=None) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        controller.poll()
        if each is not None:
            each()
        if not controller.busy:
            return
        time.sleep(0.1)
    pytest.fail(f"the controller is still busy: {controller.status}")


def start_3d(volume, roi, controller, box) -> None:
    """Place the label's 3D box as a two-click ROI and ask for it in 3D (propagate strategy)."""
    roi.AddControlPointWorld(world(volume, box[:3]))
    roi.AddControlPointWorld(world(volume, box[3:]))
    controller.options.box3d_strategy = "propagate"
    controller.request(propagate=True)


def middle_slice(label) -> int:
    ks = np.flatnonzero(label.any(axis=(1, 2)))
    return int(ks[len(ks) // 2])


def test_two_click_roi_gives_the_in_process_2d_mask(scene_setup, hippo, litemedsam):
    scene, volume, writer, roi, _, controller = scene_setup
    image, label = hippo
    k = middle_slice(label)
    i0, j0, _, i1, j1, _ = label_box(label, k)
    roi.AddControlPointWorld(world(volume, (i0, j0, k)))
    controller.poll()
    roi.AddControlPointWorld(world(volume, (i1, j1, k)))
    poll_until_idle(controller)
    assert controller.jobs_started == 1, f"one ROI placement is one segmentation ({controller.status})"
    mask = bridge.segment_to_mask(writer.segmentation_node, writer.segment_id, volume)
    expected = in_process(litemedsam, image, {"box": [i0, j0, k, i1, j1, k]})
    np.testing.assert_array_equal(mask, expected)
    assert mask[k].sum() > 20 and not np.delete(mask, k, axis=0).any()


def test_propagate_grows_in_the_segment_and_ends_at_the_in_process_mask(scene_setup, hippo, litemedsam):
    scene, volume, writer, roi, _, controller = scene_setup
    image, label = hippo
    start_3d(volume, roi, controller, label_box(label))
    sizes = []

    def record() -> None:
        if writer.segment_id is not None:
            sizes.append(int(bridge.segment_to_mask(writer.segmentation_node, writer.segment_id, volume).sum()))

    poll_until_idle(controller, each=record)
    assert "3D" in controller.status
    assert len(set(sizes)) > 2, "the 3D result was shown as it grew"
    mask = bridge.segment_to_mask(writer.segmentation_node, writer.segment_id, volume)
    prompts = {"box": list(bridge.roi_to_box(volume, roi))}
    expected = in_process(litemedsam, image, prompts, box3d_strategy="propagate", propagate=True)
    np.testing.assert_array_equal(mask, expected)


def test_scene_close_mid_job_cancels_it_and_writes_nothing_more(scene_setup, hippo, client):
    scene, volume, writer, roi, _, controller = scene_setup
    _, label = hippo
    start_3d(volume, roi, controller, label_box(label))
    controller.poll()
    job_id = controller._active.job_id
    segmentation = writer.segmentation_node
    scene.Clear()
    assert not controller.busy and controller.observed_nodes == []
    end = time.monotonic() + 120
    while client.job(job_id).state not in ("cancelled", "done", "failed") and time.monotonic() < end:
        time.sleep(0.2)
    assert client.job(job_id).state == "cancelled"
    controller.poll()
    assert segmentation.GetScene() is None or segmentation.GetSegmentation().GetNumberOfSegments() <= 1


def test_after_n_prompts_the_scene_holds_no_new_nodes(scene_setup, hippo):
    scene, volume, writer, _, positives, controller = scene_setup
    _, label = hippo
    k = middle_slice(label)
    ks, js, is_ = np.nonzero(label[k:k + 1])
    points = [(int(is_[n]), int(js[n]), k) for n in np.linspace(0, len(is_) - 1, 4).astype(int)]
    positives.AddControlPointWorld(world(volume, points[0]))
    poll_until_idle(controller)
    after_first = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    for point in points[1:]:
        positives.AddControlPointWorld(world(volume, point))
        poll_until_idle(controller)
    assert controller.jobs_started == 4
    assert {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())} == after_first


class DeferredExchange:
    """Holds each HTTP request until the test delivers it, as Qt's event loop delivers the answers
    of the module's QNetworkAccessManager exchange: later, while the controller keeps polling."""

    def __init__(self, client) -> None:
        self.blocking, self.queue = BlockingExchange(client), []

    def __call__(self, request, on_response) -> None:
        self.queue.append((request, on_response))

    def deliver(self):
        request, on_response = self.queue.pop(0)
        self.blocking(request, on_response)
        return request

    def deliver_until(self, path_end: str) -> None:
        """Answer queued requests until the next one's path ends with ``path_end``."""
        while not self.queue[0][0].path.endswith(path_end):
            self.deliver()


@pytest.fixture()
def deferred_setup(client, hippo):
    image, label = hippo
    scene = slicer.vtkMRMLScene()
    volume = bridge.image_to_volume_node(image, scene, "hippocampus")
    writer = LibrarySegmentWriter(volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S"))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    positives = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Plus")
    exchange = DeferredExchange(client)
    controller = PromptController(HttpTransport(exchange))
    controller.attach(volume, writer, roi, positives)
    yield exchange, controller, volume, writer, roi, positives
    controller.detach()


def test_answers_arriving_later_a_superseded_prompt_is_never_written(deferred_setup, hippo, client):
    """Polls return at once while a request is in flight, one request at a time; a click made
    while the previous prompt is being answered supersedes it: that answer is dropped, the newest
    prompt is sent as soon as it arrives, and its answer is what the service gives."""
    exchange, controller, volume, writer, _, positives = deferred_setup
    _, label = hippo
    k = middle_slice(label)
    js, is_ = np.nonzero(label[k])
    a, b = (int(is_[0]), int(js[0]), k), (int(is_[-1]), int(js[-1]), k)
    positives.AddControlPointWorld(world(volume, a))
    controller.poll()
    controller.poll()
    assert [r.method for r, _ in exchange.queue] == ["HEAD"] and controller.busy
    exchange.deliver_until("/prompts")
    positives.AddControlPointWorld(world(volume, b))
    controller.poll()
    assert len(exchange.queue) == 1, "nothing else is sent while a prompt is in flight"
    exchange.deliver()  # the first click's answer: superseded, never written
    assert writer.segment_id is None
    second = exchange.queue[0][0]
    assert second.path.endswith("/prompts") and len(second.json["points"]) == 2
    exchange.deliver()
    assert not controller.busy and controller.jobs_started == 2
    image = bridge.volume_node_to_image(volume)
    expected = client.prompt(client.upload_volume(image.array, image.geometry), second.json)
    mask = bridge.segment_to_mask(writer.segmentation_node, writer.segment_id, volume)
    np.testing.assert_array_equal(mask, expected.mask)
    assert mask[k].any()


def test_cancel_before_a_3d_answer_arrives_cancels_the_job_it_started(deferred_setup, hippo, client):
    exchange, controller, volume, writer, roi, _ = deferred_setup
    _, label = hippo
    start_3d(volume, roi, controller, label_box(label))
    controller.poll()
    exchange.deliver_until("/prompts")
    controller.cancel()
    assert not controller.busy and controller.status == "Cancelled."
    exchange.deliver()  # the answer names the job: it is cancelled at once
    cancel = exchange.deliver()
    assert cancel.method == "POST" and cancel.path.endswith("/cancel")
    job_id = cancel.path.split("/")[2]
    end = time.monotonic() + 120
    while not client.job(job_id).finished and time.monotonic() < end:
        time.sleep(0.2)
    assert client.job(job_id).state == "cancelled" and writer.segment_id is None and not exchange.queue


def test_refused_and_unreachable_requests_are_status_lines(scene_setup, hippo):
    scene, volume, writer, _, positives, controller = scene_setup
    _, label = hippo
    k = middle_slice(label)
    js, is_ = np.nonzero(label[k])
    controller.options.adapter = "no-such-adapter"
    positives.AddControlPointWorld(world(volume, (int(is_[0]), int(js[0]), k)))
    controller.poll()
    assert controller.status.startswith("Segmentation failed: ") and "no-such-adapter" in controller.status
    assert not controller.busy and writer.segment_id is None
    unreachable = PromptController(blocking_transport(ServiceClient("http://127.0.0.1:9", token="x", timeout=5)))
    unreachable.attach(volume, writer, None, positives)
    unreachable.request()
    unreachable.poll()
    assert unreachable.status.startswith("Segmentation failed: cannot reach the service at http://127.0.0.1:9")
    assert not unreachable.busy
    unreachable.detach()


def test_the_panels_serve_command_reads_its_ready_line_in_chunks_and_tree_kill_stops_it(tmp_path):
    """What the panel's QProcess does, without Qt: the command it runs, its output read in small
    chunks until a whole ready line arrives, the client from that line, and the stop by pid."""
    import os
    import selectors
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedFMSegment"))
    from MedFMSegmentHelpers.process_tools import LineBuffer, kill_tree, parse_ready_line, serve_command

    from MedFMSegmentLib.service.client import read_token

    command = serve_command(sys.executable, os.getpid(), tmp_path / "token", str(tmp_path / "adapters"))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.txt", "wb"),
                               env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    buffer, ready, end = LineBuffer(), None, time.monotonic() + 180
    while ready is None and time.monotonic() < end:
        if not selector.select(1):
            continue
        chunk = os.read(process.stdout.fileno(), 7)  # a ready line arrives in pieces
        if not chunk:
            break
        ready = next((r for r in map(parse_ready_line, buffer.feed(chunk.decode())) if r), None)
    assert ready is not None, (tmp_path / "stderr.txt").read_text(encoding="utf-8")[-2000:]
    client = ServiceClient(ready["url"], read_token(ready["token_file"]))
    assert client.info()["models"] == ["litemedsam"]
    assert ready["pid"] in kill_tree(ready["pid"])
    assert process.wait(30) is not None


def test_add_this_case_then_update_adapter_continues_it_in_the_service(client, data_dir):
    """The panel's "Add this case" / "Update adapter" (slicer_bridge.updates) on real MRML against
    the real service: the corrected segment as it was when added is what trains, with the checked
    training case beside it, and the adapter is replaced by its continuation."""
    from test_service import cropped_case

    from MedFMSegmentLib.errors import InputError
    from MedFMSegmentLib.slicer_bridge.updates import PendingCases, segment_for_case

    (first, first_label), (new, new_label) = cropped_case(data_dir, 3), cropped_case(data_dir, 4)
    parent = client.wait(client.finetune([first], [first_label], {"name": "panel-update", "encoder": "frozen",
                                                                  "steps": 2, "embedding_budget": 4}))
    scene = slicer.vtkMRMLScene()
    volume = bridge.image_to_volume_node(new, scene, "case 4")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "corrected")
    other = np.zeros(new.array.shape, bool)
    other[0, :4, :4] = True
    bridge.mask_to_segment(other, volume, segmentation, segment_name="another structure")
    wanted = bridge.mask_to_segment(new_label.array > 0, volume, segmentation, segment_name="panel-update")
    assert segment_for_case(segmentation, "panel-update") == wanted
    pending = PendingCases()
    with pytest.raises(InputError, match="add at least one"):
        pending.request("panel-update")
    assert pending.add(volume, segmentation, "panel-update").startswith("1 case(s)")
    assert pending.add(volume, segmentation, "panel-update").startswith("1 case(s)"), "the same volume again replaces it"
    erased = np.zeros(new.array.shape, bool)
    erased[2] = new_label.array[2] > 0
    bridge.mask_to_segment(erased, volume, segmentation, segment_id=wanted)  # edited after it was added
    with pytest.raises(InputError, match="adapter to update"):
        pending.request("")
    extra = [(first, first_label)]
    images, labels, config = pending.request("panel-update", extra, steps=2)
    assert config == {"name": "panel-update", "from": "panel-update", "overwrite": True, "steps": 2}
    np.testing.assert_array_equal(labels[-1].array > 0, new_label.array > 0)
    assert labels[-1].geometry.same_grid(new.geometry) and images[0] is first
    result = client.wait(pending.submit(client, "panel-update", extra, steps=2))
    meta = {a["name"]: a["metadata"] for a in client.adapters()}["panel-update"]
    assert result["from"] == "panel-update" and meta["lineage"][-1]["cases_added"] == 2
    assert meta["training_cases"]["count"] == 2 and meta["date"] >= parent["metadata"]["date"]
    assert meta["base_validation_dice"] is not None and meta["adapted_validation_dice"] is not None


def _run_ticking(runner, timeout_s: float = 600.0) -> None:
    """Tick a TaskRunner as the panel's QTimer does, until its task ends."""
    end = time.monotonic() + timeout_s
    while not runner.idle and time.monotonic() < end:
        time.sleep(0.1)
        runner.tick()
    assert runner.idle, "the job task did not end"


def test_fine_tuning_and_automatic_jobs_run_as_tasks_that_poll_on_each_tick(client, data_dir):
    """The panel's service jobs (slicer_bridge.jobs) over the HTTP its Qt transport sends: the
    upload, every status poll and the result each come as an answer to a yielded call, and the
    results are those of the blocking client's own requests."""
    from test_service import cropped_case

    from MedFMSegmentLib.slicer_bridge.jobs import ServiceJob, automatic_job, finetune_job
    from MedFMSegmentLib.slicer_bridge.transport import TaskRunner

    (image, label), (other, _) = cropped_case(data_dir, 3), cropped_case(data_dir, 4)
    ends, statuses, finished = [], [], []
    runner = TaskRunner(blocking_transport(client), on_end=ends.append)
    training = ServiceJob(finetune_job([image], [label], {"name": "task-adapter", "encoder": "frozen", "steps": 3,
                                                          "embedding_budget": 4}),
                          statuses.append, lambda status, result: finished.append((status, result)))
    runner.start(training.task())
    assert not runner.idle and training.job_id is not None, "it waits for the next tick after its first poll"
    _run_ticking(runner)
    (status, result), = finished
    assert status.state == "done" and result["adapter"] == "task-adapter" and result["metadata"]["steps"] == 3
    assert ends == [None] and statuses[-1] is status and len(statuses) >= 1

    automatic = ServiceJob(automatic_job(other, "task-adapter"), lambda s: None,
                           lambda status, mask: finished.append((status, mask)))
    runner.start(automatic.task())
    _run_ticking(runner)
    status, mask = finished[-1]
    expected = client.wait(client.automatic(client.upload_volume(other.array, other.geometry), "task-adapter"))
    assert status.state == "done" and mask.shape == other.array.shape
    np.testing.assert_array_equal(mask, expected)


def test_a_job_task_cancelled_through_its_cancel_call_ends_cancelled_without_a_result(client, data_dir):
    from test_service import cropped_case

    from MedFMSegmentLib.slicer_bridge.jobs import ServiceJob, finetune_job
    from MedFMSegmentLib.slicer_bridge.transport import TaskRunner

    image, label = cropped_case(data_dir, 6)
    transport, finished = blocking_transport(client), []
    runner = TaskRunner(transport, on_end=lambda error: None)
    job = ServiceJob(finetune_job([image], [label], {"name": "task-cancelled", "encoder": "frozen", "steps": 5000,
                                                     "embedding_budget": 4}),
                     lambda status: None, lambda status, result: finished.append((status, result)))
    assert job.cancel_call() is None, "nothing to cancel before the job exists"
    runner.start(job.task())
    transport.send(job.cancel_call(), lambda result, error: None)
    _run_ticking(runner, 120)
    (status, result), = finished
    assert status.state == "cancelled" and result is None
    assert "task-cancelled" not in [a["name"] for a in client.adapters()]

    # Cancel asked while the cases were still on their way (no job id yet): cancelled as soon as it starts
    early = ServiceJob(finetune_job([image], [label], {"name": "task-cancelled-early", "encoder": "frozen",
                                                       "steps": 5000, "embedding_budget": 4}),
                       lambda status: None, lambda status, result: finished.append((status, result)))
    assert early.cancel_call() is None
    runner.start(early.task())
    _run_ticking(runner, 120)
    assert finished[-1][0].state == "cancelled" and finished[-1][1] is None


def test_a_batch_tally_names_what_was_not_segmented_and_why():
    from MedFMSegmentLib.slicer_bridge.jobs import BatchTally

    tally = BatchTally(4)
    tally.done("MR 1")
    tally.fail("CT 2", "Failed: the volume has\n no voxels")
    tally.done("MR 3")
    assert tally.summary() == ("Segmented 2 of 4 volumes automatically; not segmented: CT 2 (Failed: the volume "
                               "has no voxels); 1 not started (stopped).")
    tally.cancelled = True
    assert tally.summary().endswith("1 not started (cancelled).")
    one = BatchTally(1)
    one.done("MR 1")
    assert one.summary() == "Segmented 1 of 1 volume automatically."


def test_a_batch_goes_on_after_one_volumes_refusal_and_stops_when_the_service_is_gone():
    from MedFMSegmentLib.service.protocol import ServiceError
    from MedFMSegmentLib.slicer_bridge.jobs import batch_goes_on

    assert batch_goes_on(ServiceError(400, "the volume has no voxels"))
    assert batch_goes_on(ServiceError(404, "unknown job")) and batch_goes_on(ServiceError(507, "out of memory"))
    assert batch_goes_on(ValueError("a result frame that cannot be read"))
    for status in (0, 401, 403, 500, 503):
        assert not batch_goes_on(ServiceError(status, "gone")), status
