"""Atomic file output for the cohort package (a hidden sibling renamed into place)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_target"]


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a new hidden sibling of ``path`` to write; rename it onto ``path`` on success, else delete it.

    The sibling comes from :func:`MedFMSegmentLib.io.new_sibling`, so the result gets ordinary
    file permissions, and readers see the old file or the complete new one, never a part.
    """
    from ..io import new_sibling

    path = Path(path)
    tmp = new_sibling(path, suffix=suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
