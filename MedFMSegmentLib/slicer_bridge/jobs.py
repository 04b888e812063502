"""Service jobs (automatic segmentation, fine-tuning) as tasks that never wait on the network.

A :class:`ServiceJob` is run by a :class:`~.transport.TaskRunner` over the panel's transport: it
uploads and starts the job, polls its status once per :meth:`~.transport.TaskRunner.tick` (a
QTimer in Slicer), reports each status, and hands over the result when the job is done. So
uploading a large volume to a remote GPU machine, polling and downloading the result all happen
while Slicer's event loop runs.
"""

from __future__ import annotations

from typing import Any, Callable, Generator

from ..io import MedicalImage
from ..service.protocol import JobStatus
from .transport import NEXT_POLL, Call, call

__all__ = ["BatchTally", "ServiceJob", "automatic_job", "batch_goes_on", "finetune_job"]


class ServiceJob:
    """One service job as a task: ``start`` (calls ending in the job id), polls, then the result.

    Args:
        start: A generator of :class:`~.transport.Call` objects that returns the job id.
        on_status: Called with each :class:`~MedFMSegmentLib.service.protocol.JobStatus` polled.
        on_end: Called once with the last status and, when it is ``done``, the job's result
            (else None).
    """

    def __init__(self, start: Generator, on_status: Callable[[JobStatus], None],
                 on_end: Callable[[JobStatus, Any], None]) -> None:
        self.start, self.on_status, self.on_end = start, on_status, on_end
        self.job_id: str | None = None
        self.cancel_requested = False

    def task(self) -> Generator:
        """The generator to hand to :meth:`~.transport.TaskRunner.start`."""
        self.job_id = yield from self.start
        if self.cancel_requested:  # asked while the job's data was still on its way
            yield call("cancel", self.job_id)
        while True:
            status = yield call("job", self.job_id)
            self.on_status(status)
            if status.finished:
                break
            yield NEXT_POLL
        result = (yield call("result", self.job_id)) if status.state == "done" else None
        self.on_end(status, result)

    def cancel_call(self) -> Call | None:
        """Ask for the job to be cancelled: the call that cancels it in the service, or None before
        it has started (the task then cancels it as soon as it has an id)."""
        self.cancel_requested = True
        return None if self.job_id is None else call("cancel", self.job_id)


def automatic_job(image: MedicalImage, adapter: str, keep_components: str | None = None) -> Generator:
    """Upload ``image`` and start automatic segmentation with ``adapter``; returns the job id."""
    volume_id = yield call("upload_volume", image.array, image.geometry, is_2d=image.array.shape[0] == 1)
    return (yield call("automatic", volume_id, adapter, keep_components))


def finetune_job(images: list, labels: list, config: dict) -> Generator:
    """Upload the cases and start fine-tuning with ``config``; returns the job id."""
    return (yield call("finetune", images, labels, config))


def batch_goes_on(error: BaseException) -> bool:
    """Whether a batch goes on to its next volume after ``error`` ended one volume's job.

    Yes where only that volume is concerned: a request the service refused (4xx), memory it lacked
    for this request (507), an answer that could not be read. No where nothing more can work: the
    service unreachable (status 0), the token refused (401, 403), the service itself failing (5xx).
    """
    status = getattr(error, "status", None)
    if not isinstance(status, int):
        return True
    if status == 0 or status in (401, 403):
        return False
    return 400 <= status < 500 or status == 507


class BatchTally:
    """What a batch of volumes came to: each volume segmented or not (and why), in order.

    A batch goes on after a volume that fails (a damaged volume, a grid the adapter refuses), so
    one bad volume does not stop the rest; the summary names the volumes without a result.

    Args:
        total: How many volumes the batch was given.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.segmented: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.cancelled = False

    def done(self, name: str) -> None:
        self.segmented.append(name)

    def fail(self, name: str, reason: str) -> None:
        self.failed.append((name, " ".join(str(reason).split()) or "no reason given"))

    def summary(self) -> str:
        """One status line: ``Segmented 2 of 3 volumes automatically; not segmented: CT (Failed: ...)``."""
        line = f"Segmented {len(self.segmented)} of {self.total} volume{'s' if self.total != 1 else ''} automatically"
        if self.failed:
            line += "; not segmented: " + "; ".join(f"{name} ({reason})" for name, reason in self.failed)
        skipped = self.total - len(self.segmented) - len(self.failed)
        if skipped > 0:
            line += f"; {skipped} not started ({'cancelled' if self.cancelled else 'stopped'})"
        return line + "."
