"""Embed the slice the user is looking at, and its neighbours, before the user prompts.

On a CPU the encoder dominates the first prompt on a new slice, the decoder the later ones
(``python -m bench perf`` measures both). A viewer that calls
:meth:`BackgroundEmbedder.focus` whenever the shown slice changes gets that slice embedded while
the user moves the mouse to it, so the first prompt usually costs only the decoder.

The worker embeds nearest first (the slice itself, then +1, -1, +2, -2, ...) and drops the rest of
its plan when the focus moves, so scrolling never queues up work for slices already left behind.
It calls :meth:`SegmentationSession.embedding_along`, which is thread-safe and never computes a
slice twice when a prompt asks for the same slice meanwhile.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import SegmentationSession

__all__ = ["BackgroundEmbedder", "nearest_first"]

log = logging.getLogger(__name__)


def nearest_first(index: int, radius: int, size: int) -> list[int]:
    """``index, index+1, index-1, ..., index±radius`` within ``0..size-1``."""
    order = [index]
    for step in range(1, radius + 1):
        order += [index + step, index - step]
    return [i for i in order if 0 <= i < size]


class BackgroundEmbedder:
    """A daemon thread that embeds slices around a focus slice of one session.

    Args:
        session: The session whose cache receives the embeddings.
        radius: Neighbours embedded on each side of the focus slice (0: the slice only).

    Example:
        >>> embedder = BackgroundEmbedder(session, radius=2)
        >>> embedder.focus(voxel_axis=2, index=17)   # the viewer shows axial slice 17
        >>> ...                                      # later prompts on 15..19 skip the encoder
        >>> embedder.stop()
    """

    def __init__(self, session: "SegmentationSession", radius: int = 2) -> None:
        if radius < 0:
            raise ValueError("radius must be 0 or more")
        self.session = session
        self.radius = radius
        self.embedded = 0
        self.last_error: Exception | None = None
        self._plan: list[tuple[int, int]] = []
        self._busy = False
        self._stopped = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="medfmsegment-embedder", daemon=True)
        self._thread.start()

    def focus(self, voxel_axis: int, index: int) -> None:
        """Embed slice ``index`` along ``voxel_axis`` next, then its neighbours; forget the old plan."""
        size = self.session.image.geometry.size[voxel_axis]
        plan = [(voxel_axis, i) for i in nearest_first(int(index), self.radius, size)
                if (voxel_axis, i) not in self.session.cache]
        with self._condition:
            self._plan = plan
            self._condition.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the plan is done (True) or ``timeout`` seconds passed (False)."""
        with self._condition:
            return self._condition.wait_for(lambda: (not self._plan and not self._busy) or self._stopped, timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Drop the plan and end the thread (after the slice being embedded, if any)."""
        with self._condition:
            self._stopped = True
            self._plan = []
            self._condition.notify_all()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive (it ends shortly after :meth:`stop`)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._busy = False
                self._condition.notify_all()
                self._condition.wait_for(lambda: self._plan or self._stopped)
                if self._stopped:
                    return
                voxel_axis, index = self._plan.pop(0)
                self._busy = True
            try:
                self.session.embedding_along(voxel_axis, index)
                self.embedded += 1
            except Exception as exc:  # noqa: BLE001 - a background failure must not kill the viewer
                self.last_error = exc
                log.warning("background embedding of slice %d failed: %s", index, exc)
