"""Which voxel axis to slice along: named orientations, numbers, or chosen from the prompts."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..geometry import VolumeGeometry
from ..prompts import Prompts

__all__ = ["choose_axis", "resolve_axis"]


def resolve_axis(axis: str | int, geometry: VolumeGeometry) -> int | None:
    """The voxel axis (0=I, 1=J, 2=K) that ``axis`` names on this grid, or None for ``"auto"``.

    ``axis`` is ``"axial"``, ``"coronal"``, ``"sagittal"`` (the voxel axis nearest to that
    orientation's normal), a voxel axis number, or ``"auto"``. A 2D image is always sliced along K.

    Raises:
        InputError: an unknown name or number.
    """
    if axis == "auto":
        return None
    if geometry.size[2] == 1:
        return 2
    if isinstance(axis, (int, np.integer)):
        if axis not in (0, 1, 2):
            raise InputError(f"voxel axis must be 0, 1 or 2, got {axis}")
        return int(axis)
    try:
        return geometry.voxel_axis_for(axis)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def choose_axis(prompts: Prompts, geometry: VolumeGeometry) -> int:
    """The voxel axis to slice along for these prompts (what ``axis="auto"`` uses).

    * A box flat along one voxel axis was drawn on a slice of that axis: use it.
    * A box spanning several slices on every axis: slice across its shortest physical side. Each
      slice then holds the structure's two longest extents, so the 2D box on the middle slice is
      close to tight, and propagation takes the fewest steps (drift accumulates per step).
    * Clicks only: the axis on which all clicks share one slice, K first; else K.
    """
    if geometry.size[2] == 1:
        return 2
    if prompts.box is not None:
        lower, upper = np.asarray(prompts.box[:3], float), np.asarray(prompts.box[3:], float)
        extent = upper - lower
        flat = [a for a in (2, 1, 0) if extent[a] == 0]
        if flat:
            return flat[0]
        physical = (extent + 1) * np.asarray(geometry.spacing, float)
        # Prefer K, then J, then I on (near) ties so that a cube keeps the usual axial slicing.
        return min((2, 1, 0), key=lambda a: (round(float(physical[a]), 6), -a))
    clicks = np.asarray(list(prompts.positives) + list(prompts.negatives), float).reshape(-1, 3)
    for a in (2, 1, 0):
        if len(np.unique(np.round(clicks[:, a]))) == 1:
            return a
    return 2
