"""Jobs of the service: 3D prompts, automatic segmentation and fine-tuning, run one at a time.

A :class:`JobManager` runs submitted jobs in order on one worker thread, each holding the
model's turn (:class:`.turns.ModelTurns`) while it runs: model calls never overlap, and a job
lets waiting 2D prompts and focus embeddings go first between its slices. A :class:`Job`
records its progress, the result slices written so far (``updates``, read from a cursor so a
client can draw a 3D result as it grows), its progress reports and its result or error.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import CancelledError, InputError
from ..geometry import slice_into_volume, voxel_axis_of

__all__ = ["Job", "JobManager", "JOB_STATES"]

log = logging.getLogger(__name__)
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")


@dataclass
class Job:
    """One unit of work and what a client may ask of it.

    Attributes:
        id: Random, unguessable job id.
        kind: ``"prompt"``, ``"automatic"`` or ``"finetune"``.
        state: One of :data:`JOB_STATES`.
        done, planned: Progress counts (slices, or training steps).
        stage: What it is doing now (``"embedding"``, ``"segmenting"``, ``"training"``...).
        message: One line for people (the error of a failed job).
        metrics: Numbers a client may show (fine-tuning: step, loss, val_dice).
    """

    id: str
    kind: str
    state: str = "queued"
    done: int = 0
    planned: int = 0
    stage: str = ""
    message: str = ""
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    shape: tuple | None = None
    _updates: list = field(default_factory=list)
    _reports: list = field(default_factory=list)
    _shown: np.ndarray | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: threading.Event = field(default_factory=threading.Event)

    def status(self) -> dict:
        """The job's state as JSON fields."""
        with self._lock:
            return {"job_id": self.id, "kind": self.kind, "state": self.state, "done": self.done,
                    "planned": self.planned, "stage": self.stage, "message": self.message,
                    "metrics": dict(self.metrics), "updates": len(self._updates)}

    def progress(self, done: int, planned: int, stage: str | None = None) -> None:
        with self._lock:
            self.done, self.planned = int(done), int(planned)
            if stage is not None:
                self.stage = stage

    def start_mask(self, shape: tuple) -> None:
        """Begin tracking a ``(K, J, I)`` result of ``shape`` slice by slice."""
        with self._lock:
            self.shape = tuple(int(v) for v in shape)
            self._shown = np.zeros(self.shape, dtype=bool)

    def add_update(self, array_axis: int, index: int, plane: np.ndarray) -> None:
        """Record slice ``index`` along numpy axis ``array_axis`` (0: K) of the result as written."""
        plane = np.array(plane, dtype=bool, copy=True)
        with self._lock:
            if self._shown is not None:
                slice_into_volume(self._shown, voxel_axis_of(array_axis), index, plane)
            self._updates.append((int(array_axis), int(index), plane))

    def finish_mask(self, mask: np.ndarray) -> None:
        """Add updates for every K slice where the slices sent so far differ from ``mask``, so that
        replaying all updates gives exactly the final result (refinement may change slices after
        they were first written, and some strategies write no slices as they go)."""
        if self._shown is None:
            self.start_mask(mask.shape)
        changed = np.flatnonzero((self._shown != mask).any(axis=(1, 2)))
        for k in changed:
            self.add_update(0, int(k), mask[k])

    def add_report(self, report: dict) -> None:
        """Record one progress report as the library gave it (fine-tuning: embedding counts, then
        step, loss and validation Dice per step), non-finite numbers as None (JSON has none)."""
        clean = {str(k): (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}
        with self._lock:
            self._reports.append(clean)

    def reports_since(self, since: int) -> tuple[int, list[dict]]:
        """``(next cursor, reports from cursor since)``: a client prints every one, none twice."""
        with self._lock:
            since = max(0, int(since))
            return len(self._reports), list(self._reports[since:])

    def updates_since(self, since: int) -> tuple[int, list[tuple[int, int, np.ndarray]]]:
        """``(next cursor, updates from cursor since)``."""
        with self._lock:
            since = max(0, int(since))
            return len(self._updates), list(self._updates[since:])

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is finished (True) or ``timeout`` passed (False)."""
        return self._finished.wait(timeout)

    def _finish(self, state: str, message: str = "", result: Any = None) -> None:
        with self._lock:
            self.state, self.message, self.result = state, message, result
            if state == "done":
                self.stage = "done"
        self._finished.set()


class JobManager:
    """Runs jobs one at a time on a worker thread, in ``turns``; keeps the last ``keep`` finished ones.

    Args:
        turns: The model's turns (shared with the 2D fast path and the focus worker).
        keep: Finished jobs kept for their results; older ones are forgotten.
        max_queued: Jobs waiting at most; more are refused (a client in a loop cannot fill memory).
    """

    def __init__(self, turns, keep: int = 8, max_queued: int = 64) -> None:
        self.turns = turns
        self.keep = keep
        self.max_queued = max_queued
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: list[tuple[Job, Callable[[Job], Any]]] = []
        self._condition = threading.Condition()
        self._stopped = False
        self._counter = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="medfmsegment-jobs", daemon=True)
        self._thread.start()

    def submit(self, kind: str, work: Callable[[Job], Any]) -> Job:
        """Queue ``work(job)``; its return value becomes the job's result."""
        job = Job(id=f"{next(self._counter)}-{secrets.token_hex(8)}", kind=kind)
        with self._condition:
            if self._stopped:
                raise InputError("the service is shutting down")
            if len(self._queue) >= self.max_queued:
                raise InputError(f"too many jobs waiting ({self.max_queued}); cancel some first")
            self._jobs[job.id] = job
            self._queue.append((job, work))
            self._forget_old()
            self._condition.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._condition:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._condition:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop: a queued job never starts, a running one stops at its next check."""
        job = self.get(job_id)
        if job is not None:
            job.cancel.set()
        return job

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel every job and wait (up to ``timeout``) for the running one to stop."""
        with self._condition:
            self._stopped = True
            for job in self._jobs.values():
                job.cancel.set()
            self._condition.notify_all()
        self._thread.join(timeout)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in finished[:max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._queue or self._stopped)
                if not self._queue:
                    return
                job, work = self._queue.pop(0)
            self._execute(job, work)
            with self._condition:
                self._forget_old()

    def _execute(self, job: Job, work: Callable[[Job], Any]) -> None:
        if job.cancel.is_set():
            job._finish("cancelled", "cancelled before it started")
            return
        with job._lock:
            job.state = "running"
        try:
            with self.turns.job():
                result = work(job)
        except CancelledError:
            job._finish("cancelled", "cancelled")
        except InputError as exc:
            job._finish("failed", str(exc).splitlines()[0] if str(exc) else "bad input")
        except MemoryError:
            job._finish("failed", "out of memory")
        except Exception as exc:  # noqa: BLE001 - a job's failure is reported, the service goes on
            log.exception("job %s failed", job.id)
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            job._finish("failed", f"internal error: {type(exc).__name__}: {text}")
        else:
            job._finish("done", job.message, result)
