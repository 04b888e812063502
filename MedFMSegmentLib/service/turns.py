"""Who uses the model now: one long job at a time, interactive requests first between its slices.

A job (a 3D prompt, automatic segmentation, fine-tuning) holds the model for its whole run but
offers it at every checkpoint: each slice, embedding batch and training step, where the library
checks its ``cancel`` event. :meth:`ModelTurns.checkpoint` wraps that event, so at those points
the job waits while interactive requests (2D prompts, focus embeddings) are waiting or running,
then takes the model back. The handoff is fair: a waiting counter and one condition, so a
request that arrives during a job's slice runs right after that slice, and the job resumes
only when no request is left waiting (never a bare release and re-acquire the job could win).

Between slices the job's state is its own (the carried masks are copies), so a 2D prompt on the
same volume in between changes neither result.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["ModelTurns", "Checkpoint"]


class ModelTurns:
    """Turns on the model: :meth:`interactive` for short requests, :meth:`job` for long ones."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._busy = False          # someone computes with the model
        self._waiting = 0           # interactive requests waiting for their turn
        self._job_thread: int | None = None
        self.handoffs = 0           # times a job let interactive requests go first (for tests, benchmarks)

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        """Hold the model for one short request; waits at most for the slice a job is on."""
        with self._condition:
            self._waiting += 1
            try:
                self._condition.wait_for(lambda: not self._busy)
            finally:
                self._waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Hold the model for a job (one job at a time: the job manager runs them in order)."""
        with self._condition:
            self._condition.wait_for(lambda: not self._busy and not self._waiting)
            self._busy, self._job_thread = True, threading.get_ident()
        try:
            yield
        finally:
            with self._condition:
                self._busy, self._job_thread = False, None
                self._condition.notify_all()

    def offer(self) -> None:
        """Called by the running job between slices: let every waiting interactive request run,
        then take the model back. A no-op when none waits, or outside the job's own thread."""
        with self._condition:
            if not self._waiting or self._job_thread != threading.get_ident():
                return
            self.handoffs += 1
            self._busy = False
            self._condition.notify_all()
            self._condition.wait_for(lambda: not self._busy and not self._waiting)
            self._busy = True

    def checkpoint(self, cancel: threading.Event) -> "Checkpoint":
        """``cancel`` as the library sees it in a job: each check first offers the model."""
        return Checkpoint(self, cancel)


class Checkpoint:
    """A job's cancel event whose :meth:`is_set` offers the model first (see :class:`ModelTurns`).

    The library reads a cancel event only with ``is_set()``, once per slice, embedding batch or
    training step: exactly where the job can pause.
    """

    def __init__(self, turns: ModelTurns, event: threading.Event) -> None:
        self.turns, self.event = turns, event

    def is_set(self) -> bool:
        self.turns.offer()
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()
