"""Inputs and checks shared by the reliability matrix and the kill tests.

Small synthetic volumes (a bright ellipse on the middle of three slices), DICOM series, damaged
files, and a snapshot of a folder (every file's SHA-256, every folder) to prove that inputs are
unchanged and nothing is left behind.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from conftest import ellipsoid_mask, write_dicom_series

__all__ = ["Row", "ROWS", "row", "BOX", "write_volume", "volume_image", "snapshot", "write_series",
           "truncate", "prompts_for"]

#: A one-slice box around the ellipse of :func:`write_volume` (I0 J0 K0 I1 J1 K1).
BOX = [12, 10, 1, 36, 30, 1]


@dataclass
class Row:
    """One row of the matrix: how to build it and what must hold.

    ``build(tmp)`` returns a :class:`Expect`; ``id`` is the test id, ``defect`` the issue's
    defect number (or "holds" for a case that already held), ``what`` one line for the docs table.
    """

    id: str
    defect: str
    what: str
    build: Callable[[Path], "Expect"]


@dataclass
class Expect:
    """What running a row must give.

    Attributes:
        argv: ``medfmsegment`` arguments (run in-process), or None when ``call`` is given.
        call: A function returning an exit code, for library-level rows.
        code: Expected exit code (or the codes allowed, for a row whose message belongs to another part).
        message: Substring of the one stderr line (code 2) or of stdout (other codes).
        creates: Paths (relative to the row's folder) that must be new afterwards; nothing else.
        changes: Existing paths allowed to change (outputs rewritten on purpose).
        check: Extra assertions, called as ``check(tmp, stdout)``.
    """

    argv: list[str] | None = None
    call: Callable[[], int] | None = None
    code: int | tuple[int, ...] = 2
    message: str = ""
    creates: set[str] = field(default_factory=set)
    changes: set[str] = field(default_factory=set)
    check: Callable[[Path, str], None] | None = None


ROWS: list[Row] = []


def row(id: str, defect: str, what: str):
    """Register a row builder (decorator)."""
    def register(build: Callable[[Path], Expect]) -> Callable[[Path], Expect]:
        ROWS.append(Row(id, defect, what, build))
        return build
    return register


def volume_image(shape=(3, 40, 48), spacing=(0.9, 0.9, 2.0), direction=None, origin=(-10.0, 5.0, 2.0),
                 dtype=np.float32, seed: int = 0) -> sitk.Image:
    """A bright ellipse on slice 1 of a ``(K, J, I)`` volume, as a SimpleITK image."""
    truth = ellipsoid_mask(shape, (1, 20, 24), (1.2, 9, 11))
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((50 + 300 * truth + 10 * rng.standard_normal(shape)).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return image


def write_volume(path: Path, **kwargs) -> Path:
    """Write :func:`volume_image` to ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume_image(**kwargs), str(path))
    return path


def write_series(folder: Path, uid: str = "1.2.826.0.1.3680043.2.1125.7.1", prefix: str = "IM", depth: int = 8,
                 spacing: float = 2.0) -> Path:
    """A DICOM series of ``depth`` slices (int16) in ``folder``."""
    image = sitk.Cast(volume_image(shape=(depth, 40, 48), spacing=(0.9, 0.9, spacing)), sitk.sitkInt16)
    write_dicom_series(image, folder, series_uid=uid, prefix=prefix)
    return folder


def truncate(path: Path, keep: float = 0.6) -> Path:
    """Cut a file to a fraction of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def prompts_for(path: Path, entries: dict) -> Path:
    """Write a ``--prompts`` JSON file."""
    import json

    path.write_text(json.dumps(entries))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): files by SHA-256, links by target, folders."""
    entries: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries
