"""Prompts in voxel indices and the 2D box arithmetic inference uses.

A :class:`Prompts` holds what a user gives: at most one box (a 3D box, or a 2D box on one
slice) and any number of positive and negative clicks, all as 0-based voxel indices
``(i, j, k)``. In 2D, boxes are ``(col0, row0, col1, row1)`` with inclusive corners and clicks
are ``(col, row)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError
from .geometry import VolumeGeometry

__all__ = ["Box2D", "Prompts", "apply_click_constraints", "components_touching", "expand_box", "mask_bbox",
           "scale_box", "smooth_box_track"]

Box2D = tuple[float, float, float, float]


@dataclass
class Prompts:
    """User prompts in voxel indices.

    Attributes:
        box: ``(i0, j0, k0, i1, j1, k1)`` inclusive corners, or None.
        positives: Clicks on the structure, ``(i, j, k)`` each.
        negatives: Clicks on background, ``(i, j, k)`` each.
    """

    box: tuple[int, int, int, int, int, int] | None = None
    positives: list[tuple[float, float, float]] = field(default_factory=list)
    negatives: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.box is None and not self.positives

    def validate(self, geometry: VolumeGeometry) -> None:
        """Raise :class:`InputError` for a box or click outside the image or an inverted box."""
        size = geometry.size
        if self.box is not None:
            if len(self.box) != 6:
                raise InputError("a box needs six numbers: I0 J0 K0 I1 J1 K1")
            lower, upper = self.box[:3], self.box[3:]
            for axis, name in enumerate("IJK"):
                if lower[axis] > upper[axis]:
                    raise InputError(f"inverted box: {name}0={lower[axis]} > {name}1={upper[axis]}")
                if lower[axis] < 0 or upper[axis] > size[axis] - 1:
                    raise InputError(f"box {name} range {lower[axis]}..{upper[axis]} is outside the image "
                                     f"(valid 0..{size[axis] - 1})")
        for kind, points in (("click", self.positives), ("negative click", self.negatives)):
            for point in points:
                if len(point) != 3:
                    raise InputError(f"a {kind} needs three numbers: I J K")
                if not geometry.contains_index(point):
                    raise InputError(f"{kind} {tuple(point)} is outside the image of size {size}")
        if self.is_empty and self.negatives:
            raise InputError("negative clicks need a box or a positive click")

    def to_dict(self) -> dict:
        return {"box": list(self.box) if self.box else None,
                "points": [list(p) for p in self.positives],
                "negatives": [list(p) for p in self.negatives]}

    @classmethod
    def from_dict(cls, data: dict) -> "Prompts":
        """From ``{"box": [...6], "points": [[i, j, k], ...], "negatives": [...]}`` (all optional)."""
        try:
            box = data.get("box")
            return cls(tuple(int(round(v)) for v in box) if box else None,
                       [tuple(float(v) for v in p) for p in data.get("points", [])],
                       [tuple(float(v) for v in p) for p in data.get("negatives", [])])
        except (TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"malformed prompts {json.dumps(data)[:120]}: {exc}") from None


# ---------------------------------------------------------------------------- 2D boxes
def mask_bbox(mask: np.ndarray) -> Box2D | None:
    """Tight inclusive box ``(col0, row0, col1, row1)`` of a 2D mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))


def expand_box(box: Box2D, margin: float | tuple[float, float], shape: tuple[int, int],
               limit: Box2D | None = None) -> Box2D:
    """Grow a box by ``margin`` pixels (or ``(col, row)`` margins), clipped to the slice and to ``limit``."""
    mc, mr = (margin, margin) if np.isscalar(margin) else margin
    c0, r0, c1, r1 = box
    lo_c, lo_r, hi_c, hi_r = 0.0, 0.0, shape[1] - 1.0, shape[0] - 1.0
    if limit is not None:
        lo_c, lo_r, hi_c, hi_r = max(lo_c, limit[0]), max(lo_r, limit[1]), min(hi_c, limit[2]), min(hi_r, limit[3])
    return (max(lo_c, c0 - mc), max(lo_r, r0 - mr), min(hi_c, c1 + mc), min(hi_r, r1 + mr))


def scale_box(box: Box2D, factor: float, shape: tuple[int, int]) -> Box2D:
    """Scale a box ``(col0, row0, col1, row1)`` about its centre by ``factor``, clipped to the slice."""
    centre_c, centre_r = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half_c, half_r = (box[2] - box[0]) / 2 * factor, (box[3] - box[1]) / 2 * factor
    return expand_box((centre_c - half_c, centre_r - half_r, centre_c + half_c, centre_r + half_r), 0.0, shape)


def components_touching(mask: np.ndarray, points: Iterable[Sequence[float]]) -> np.ndarray:
    """The connected components of a 2D mask that contain any of ``points`` ``(col, row)``."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask.astype(bool)
    keep = {int(labels[int(round(r)), int(round(c))]) for c, r in points} - {0}
    return np.isin(labels, list(keep)) if keep else np.zeros_like(mask, dtype=bool)


def apply_click_constraints(mask: np.ndarray, positives: Sequence[Sequence[float]],
                            negatives: Sequence[Sequence[float]]) -> np.ndarray:
    """Keep components under positive clicks (if any is under one) and drop those under negatives."""
    mask = mask.astype(bool)
    if positives:
        kept = components_touching(mask, positives)
        if kept.any():
            mask = kept
    if negatives:
        mask = mask & ~components_touching(mask, negatives)
    return mask


def smooth_box_track(indices: Sequence[int], boxes: Sequence[Box2D], targets: Sequence[int],
                     degree: int = 2) -> list[Box2D]:
    """Boxes for slices ``targets`` from boxes seen on slices ``indices``: one size, smooth centres.

    The centres (column, row) follow a polynomial of the slice index (degree 2, lower when few
    slices are seen); every box gets the median width and height of the seen boxes. Per-slice
    boxes from a rough mask are noisy in both place and size; a structure's cross-section moves
    and changes smoothly, so a fit through all of them places each box better than any one.

    Returns:
        One ``(col0, row0, col1, row1)`` box per target slice (not clipped: see :func:`expand_box`).
    """
    x = np.asarray(indices, dtype=float)
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    if len(x) == 0:
        raise ValueError("no boxes to smooth")
    degree = min(degree, len(np.unique(x)) - 1)
    t = np.asarray(targets, dtype=float)
    centres = [np.polyval(np.polyfit(x, (b[:, k] + b[:, k + 2]) / 2, degree), t) for k in (0, 1)]
    half_w, half_h = np.median(b[:, 2] - b[:, 0]) / 2, np.median(b[:, 3] - b[:, 1]) / 2
    return [(float(c - half_w), float(r - half_h), float(c + half_w), float(r + half_h))
            for c, r in zip(centres[0], centres[1])]
