"""Service jobs the panel runs: fine-tuning (with a live chart) and automatic segmentation of volumes.

Each task runs a :class:`~MedFMSegmentLib.slicer_bridge.jobs.ServiceJob` over the logic's
non-blocking transport (uploads, status polls on a QTimer, the result: none of them waits on the
network, so a large volume or a remote service never freezes Slicer), sends arrays only (no temp
files with patient data), drives a progress bar and a Cancel button, and reports one status line
per change; nothing here raises into Qt.
"""

from __future__ import annotations

import logging
from typing import Callable, Generator, Optional

import qt
import slicer

from .settings import adaptation_summary, training_line, validation_figures

__all__ = ["ServiceTask", "AdaptationTask", "AutomaticTask"]


class ServiceTask:
    """A progress bar, a Cancel button and a status callback around one job at a time."""

    def __init__(self, logic, progressBar, cancelButton, status: Callable[[str], None], poll_ms: int = 500) -> None:
        self.logic, self.progressBar, self.cancelButton, self.status = logic, progressBar, cancelButton, status
        self.job = None  # the ServiceJob running
        self.runner = None  # its TaskRunner
        self._timer = qt.QTimer()
        self._timer.setInterval(poll_ms)
        self._timer.connect("timeout()", self._tick)

    @property
    def running(self) -> bool:
        return self.runner is not None and not self.runner.idle

    def _tick(self) -> None:
        if self.runner is not None:
            self.runner.tick()

    def _follow(self, start: Generator, on_done: Callable, on_status: Optional[Callable] = None,
                on_failed: Optional[Callable[[str, bool], None]] = None) -> None:
        """Run the job that ``start`` uploads and starts; ``on_done(status, result)`` when it is done.

        ``on_failed(line, go_on)``, when given, gets the status line of a job that did not end
        done instead of the status bar; ``go_on`` is False when it was cancelled or the service
        stopped answering (nothing more should be sent), True when only this job failed.
        """
        from MedFMSegmentLib.slicer_bridge.jobs import ServiceJob, batch_goes_on
        from MedFMSegmentLib.slicer_bridge.transport import TaskRunner

        if self.logic.transport is None:
            if on_failed is None:
                self.status("Start the service first.")
            else:
                on_failed("Start the service first.", False)
            return
        self.progressBar.visible = True
        self.progressBar.value = 0
        self.cancelButton.enabled = True
        outcome = {}

        def status(job) -> None:
            if job.planned:
                self.progressBar.value = int(100 * min(1.0, job.done / job.planned))
            self.status(f"{job.stage or job.state}: {job.done} of {job.planned}")
            if on_status is not None:
                on_status(job)

        def end(job, result) -> None:  # inside the task: only noted, acted on once it has ended
            outcome["job"], outcome["result"] = job, result

        def ended(error) -> None:
            if runner is not self.runner:  # a task replaced since
                return
            self._timer.stop()
            self.cancelButton.enabled = False
            job = outcome.get("job")

            def report(line: str, go_on: bool = True) -> None:
                if on_failed is None:
                    self.status(line)
                else:
                    on_failed(line, go_on)

            if error is not None or job is None:
                self.progressBar.visible = False
                if task.job_id is None:  # refused (a name taken, a bad label grid...) or unreachable
                    report(f"Not started: {error}", batch_goes_on(error))
                elif error is not None and batch_goes_on(error):  # this job's answer only (a result refused...)
                    report(f"Failed: {error}")
                else:
                    report(f"The service stopped answering: {error}" if error else "The service stopped answering.",
                           False)
            elif job.state == "done":
                self.progressBar.value = 100
                try:
                    on_done(job, outcome["result"])
                except Exception as exc:  # noqa: BLE001 - report, never raise from a timer
                    logging.exception("MedFMSegment: loading a result failed")
                    report(f"Could not load the result: {exc}")
            else:
                self.progressBar.visible = False
                report(f"{job.state.capitalize()}: {job.message}" if job.message else job.state.capitalize(),
                       job.state != "cancelled")

        task = self.job = ServiceJob(start, status, end)
        runner = self.runner = TaskRunner(self.logic.transport, on_end=ended)
        self._timer.start()
        runner.start(self.job.task())

    def cancel(self) -> None:
        """Ask the service to cancel the job (at once, or as soon as its upload has started it); the
        task reports the end when the job stops."""
        if self.running:
            cancel = self.job.cancel_call()
            if cancel is not None:
                self.runner.transport.send(cancel, lambda result, error: None)

    def drop(self) -> None:
        """Cancel the job and forget it: nothing it answers later is written (the scene it was for
        is closing)."""
        self.cancel()
        if self.runner is not None:
            self.runner.drop()
        self.runner = self.job = None
        self._timer.stop()
        self.cancelButton.enabled = False
        self.progressBar.visible = False


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
        from MedFMSegmentLib.slicer_bridge.jobs import finetune_job

        pairs = self.pairs(label_nodes, default_volume)
        self._track(finetune_job([p[0] for p in pairs], [p[1] for p in pairs], config), config.get("name", "adapter"),
                    on_finished)

    def update(self, pending, adapter: str, label_nodes: list, default_volume, steps: int,
               on_finished: Callable[[dict], None]) -> None:
        """Update ``adapter`` with the added cases (``PendingCases``) and the checked training cases."""
        from MedFMSegmentLib.slicer_bridge.jobs import finetune_job

        images, labels, config = pending.request(adapter, self.pairs(label_nodes, default_volume), steps)
        self._track(finetune_job(images, labels, config), f"{adapter} update", on_finished)

    def _track(self, start: Generator, title: str, on_finished: Callable[[dict], None]) -> None:
        from MedFMSegmentLib.slicer_bridge.chart import TrainingChart

        if self.chart is not None:
            self.chart.remove()
            self.chart = None

        def on_status(job) -> None:  # the chart comes with the first status: a refused job leaves none
            if self.chart is None:
                self.chart = TrainingChart(slicer.mrmlScene, f"{title} fine-tuning")
                self._showChart()
            metrics = job.metrics or {}
            self.chart.add(metrics.get("step"), metrics.get("loss"), metrics.get("val_dice"), metrics.get("base_val_dice"))
            line = training_line(job.stage, job.done, job.planned, metrics)
            if line:
                self.status(line)

        def on_done(job, result: dict) -> None:
            if self.chart is not None:
                self.chart.finish(*validation_figures(result.get("metadata")))
            self.status(adaptation_summary(result))
            on_finished(result)

        self._follow(start, on_done, on_status)

    def _showChart(self) -> None:
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView)
        plotWidget = layoutManager.plotWidget(0)
        if plotWidget is not None:
            plotWidget.mrmlPlotViewNode().SetPlotChartNodeID(self.chart.chart.GetID())


class AutomaticTask(ServiceTask):
    """Segments volumes one after the other with an adapter (prompt-free), each into a segmentation.

    A volume that fails is noted and the next one runs; the last status line says how many of
    them were segmented and names the others with why (:class:`~MedFMSegmentLib.slicer_bridge.jobs.BatchTally`).
    """

    def start(self, volume_nodes: list, adapter: str, target: Optional[Callable] = None) -> None:
        """``target(volume_node, mask)`` writes a result (default: a new segmentation per volume)."""
        from MedFMSegmentLib.slicer_bridge.jobs import BatchTally

        self._queue = list(volume_nodes)
        self._adapter, self._target = adapter, target
        self.tally = BatchTally(len(self._queue))
        self._next()

    def _next(self) -> None:
        from MedFMSegmentLib.slicer_bridge import volume_node_to_image
        from MedFMSegmentLib.slicer_bridge.cases import add_result_segmentation
        from MedFMSegmentLib.slicer_bridge.jobs import automatic_job

        while self._queue:
            volume = self._queue.pop(0)
            name = volume.GetName()
            try:
                image = volume_node_to_image(volume)
            except Exception as exc:  # noqa: BLE001 - a volume without usable image data: note it, go on
                self.tally.fail(name, str(exc))
                continue
            break
        else:
            self.status(self.tally.summary())
            return

        def on_done(job, mask) -> None:  # a write that raises ends in on_failed instead
            if self._target is not None:
                self._target(volume, mask)
            else:
                add_result_segmentation(slicer.mrmlScene, volume, mask)
            self.tally.done(name)
            qt.QTimer.singleShot(0, self._next)  # after this job's end is handled, not inside it

        def on_failed(line: str, go_on: bool) -> None:
            self.tally.fail(name, line)
            if not go_on:
                self.tally.cancelled = self.tally.cancelled or line.startswith("Cancelled")
                self._queue = []
            qt.QTimer.singleShot(0, self._next)

        self._follow(automatic_job(image, self._adapter), on_done, on_failed=on_failed)

    def cancel(self) -> None:
        self._queue = []
        if getattr(self, "tally", None) is not None:
            self.tally.cancelled = True
        super().cancel()
