"""Service jobs the panel runs: fine-tuning (with a live chart) and automatic segmentation of volumes.

Each task sends arrays to the service (no temp files with patient data), polls its job from a
QTimer (:class:`~MedFMSegmentHelpers.service_process.JobPoller`), drives a progress bar and a
Cancel button, and reports one status line per change; nothing here raises into Qt.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import slicer

from .service_process import JobPoller
from .settings import adaptation_summary, training_line, validation_figures

__all__ = ["ServiceTask", "AdaptationTask", "AutomaticTask"]


class ServiceTask:
    """A progress bar, a Cancel button and a status callback around one job at a time."""

    def __init__(self, logic, progressBar, cancelButton, status: Callable[[str], None]) -> None:
        self.logic, self.progressBar, self.cancelButton, self.status = logic, progressBar, cancelButton, status
        self.poller: Optional[JobPoller] = None

    @property
    def running(self) -> bool:
        return self.poller is not None and self.poller.active

    def _follow(self, job_id: str, on_done: Callable, on_status: Optional[Callable] = None) -> None:
        self.progressBar.visible = True
        self.progressBar.value = 0
        self.cancelButton.enabled = True

        def status(job) -> None:
            if job.planned:
                self.progressBar.value = int(100 * min(1.0, job.done / job.planned))
            self.status(f"{job.stage or job.state}: {job.done} of {job.planned}")
            if on_status is not None:
                on_status(job)

        def end(job) -> None:
            self.cancelButton.enabled = False
            self.poller = None
            if job is None:
                self.status("The service stopped answering.")
            elif job.state == "done":
                self.progressBar.value = 100
                try:
                    on_done(job)
                except Exception as exc:  # noqa: BLE001 - report, never raise from a timer
                    logging.exception("MedFMSegment: loading a result failed")
                    self.status(f"Could not load the result: {exc}")
            else:
                self.status(f"{job.state.capitalize()}: {job.message}" if job.message else job.state.capitalize())
            if job is None or job.state != "done":
                self.progressBar.visible = False

        self.poller = JobPoller(self.logic.client, job_id, status, end)

    def cancel(self) -> None:
        if self.poller is not None:
            self.poller.cancel()


class AdaptationTask(ServiceTask):
    """Fine-tunes an adapter in the service on labelled scene cases; plots loss and validation Dice
    beside the base model's, and ends with both final figures in the chart's title."""

    chart = None

    @staticmethod
    def pairs(label_nodes: list, default_volume) -> list:
        """``(image, label)`` of each training label node (checked, see ``training_pair``)."""
        from MedFMSegmentLib.slicer_bridge.cases import training_pair, training_volume_for

        return [training_pair(training_volume_for(label, default_volume), label) for label in label_nodes]

    def start(self, label_nodes: list, default_volume, config: dict, on_finished: Callable[[dict], None]) -> None:
        pairs = self.pairs(label_nodes, default_volume)
        job_id = self.logic.client.finetune([p[0] for p in pairs], [p[1] for p in pairs], config)
        self._track(job_id, config.get("name", "adapter"), on_finished)

    def update(self, pending, adapter: str, label_nodes: list, default_volume, steps: int,
               on_finished: Callable[[dict], None]) -> None:
        """Update ``adapter`` with the added cases (``PendingCases``) and the checked training cases."""
        job_id = pending.submit(self.logic.client, adapter, self.pairs(label_nodes, default_volume), steps)
        self._track(job_id, f"{adapter} update", on_finished)

    def _track(self, job_id: str, title: str, on_finished: Callable[[dict], None]) -> None:
        from MedFMSegmentLib.slicer_bridge.chart import TrainingChart

        if self.chart is not None:
            self.chart.remove()
        self.chart = TrainingChart(slicer.mrmlScene, f"{title} fine-tuning")
        self._showChart()

        def on_status(job) -> None:
            metrics = job.metrics or {}
            self.chart.add(metrics.get("step"), metrics.get("loss"), metrics.get("val_dice"), metrics.get("base_val_dice"))
            line = training_line(job.stage, job.done, job.planned, metrics)
            if line:
                self.status(line)

        def on_done(job) -> None:
            result = self.logic.client.result(job.job_id)
            self.chart.finish(*validation_figures(result.get("metadata")))
            self.status(adaptation_summary(result))
            on_finished(result)

        self._follow(job_id, on_done, on_status)

    def _showChart(self) -> None:
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView)
        plotWidget = layoutManager.plotWidget(0)
        if plotWidget is not None:
            plotWidget.mrmlPlotViewNode().SetPlotChartNodeID(self.chart.chart.GetID())


class AutomaticTask(ServiceTask):
    """Segments volumes one after the other with an adapter (prompt-free), each into a segmentation."""

    def start(self, volume_nodes: list, adapter: str, target: Optional[Callable] = None) -> None:
        """``target(volume_node, mask)`` writes a result (default: a new segmentation per volume)."""
        self._queue = list(volume_nodes)
        self._adapter, self._target = adapter, target
        self._done = 0
        self._next()

    def _next(self) -> None:
        from MedFMSegmentLib.slicer_bridge import volume_node_to_image
        from MedFMSegmentLib.slicer_bridge.cases import add_result_segmentation

        if not self._queue:
            self.status(f"Segmented {self._done} volume(s) automatically.")
            return
        volume = self._queue.pop(0)
        image = volume_node_to_image(volume)
        volume_id = self.logic.client.upload_volume(image.array, image.geometry, is_2d=image.array.shape[0] == 1)
        job_id = self.logic.client.automatic(volume_id, self._adapter)

        def on_done(job) -> None:
            mask = self.logic.client.result(job.job_id)
            if self._target is not None:
                self._target(volume, mask)
            else:
                add_result_segmentation(slicer.mrmlScene, volume, mask)
            self._done += 1
            self._next()

        self._follow(job_id, on_done)

    def cancel(self) -> None:
        self._queue = []
        super().cancel()
