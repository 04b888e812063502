"""The ``sparse`` strategy: consensus of two axes with a fraction of the encoder work.

1. Propagate across the box's shortest physical side (kept as logits), the prompted middle slice
   first, then outwards (what ``propagate`` does).
2. On the slices across the longest side a compact structure is a blob that the model segments
   well from a box close to it; only every ``sparse_stride``-th of them is embedded (the middle
   one, then every ``sparse_stride``-th outwards, the first and last included). Their boxes are
   read from the current mask, fitted by one smooth track
   (:func:`~MedFMSegmentLib.prompts.smooth_box_track`) and decoded; a slice in between takes the
   distance-weighted mean of its decoded neighbours' logits. The sum with step 1's logits is the
   new mask.
3. Step 2 runs ``sparse_rounds`` times; from round ``sparse_rebox_after`` on, each slice across
   the shortest side is also decoded with the current mask's own box on it
   (:func:`~.consensus.rebox_logits`, decoder calls only) and its logits join the sum.

It embeds the shortest side's slices and a quarter of the longest side's (with the default
stride), against all three sides for ``consensus``.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from ..geometry import axes_by_extent, box_on_axis, slice_into_volume
from .consensus import rebox_logits, track_logits
from .propagate import propagate_box_logits
from .settings import NOT_SEGMENTED_LOGIT, PredictorSettings, ProgressCallback, UpdateCallback, emit_changes
from .slices import SliceDecoder

__all__ = ["interpolate_logits", "outward_order", "segment_box_sparse", "sparse_slices"]


def outward_order(indices: Sequence[int], start: int) -> list[int]:
    """``indices`` from ``start`` outwards: nearest first, the higher side first on ties."""
    return sorted(indices, key=lambda i: (abs(i - start), -i))


def sparse_slices(first: int, last: int, stride: int) -> list[int]:
    """The slices of ``first..last`` that are embedded: the middle one and every ``stride``-th
    from it, ``first`` and ``last`` included, in :func:`outward_order`."""
    start = (first + last) // 2
    chosen = set(range(start, last + 1, stride)) | set(range(start, first - 1, -stride)) | {first, last}
    return outward_order(sorted(chosen), start)


def interpolate_logits(logits: dict[int, np.ndarray], index: int) -> np.ndarray:
    """Logits of slice ``index``: its own when decoded, else the distance-weighted mean of the
    nearest decoded slice on each side."""
    if index in logits:
        return logits[index]
    below = max(i for i in logits if i < index)
    above = min(i for i in logits if i > index)
    w = (index - below) / (above - below)
    return (1 - w) * logits[below] + w * logits[above]


def segment_box_sparse(along: Callable[[int], SliceDecoder], box: Sequence[float], shape: tuple[int, int, int],
                       spacing: Sequence[float], settings: PredictorSettings,
                       progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
                       on_update: UpdateCallback | None = None) -> np.ndarray:
    """Segment the voxel ``box`` (i0, j0, k0, i1, j1, k1) from two of its axes.

    Args:
        along: The :class:`SliceDecoder` of a voxel axis.
        box: The 3D box, spanning several slices on every axis.
        shape: ``(K, J, I)`` array shape of the volume; ``spacing`` its voxel size ``(I, J, K)``.
        settings: ``sparse_stride``, ``sparse_rounds``, ``sparse_rebox_after``.
        progress: Called with (stages done, stages planned): the propagation, then each round.
        cancel: Set it to stop with :class:`~MedFMSegmentLib.errors.CancelledError`.
        on_update: Sees the propagation's slices as they are written (the prompted middle slice
            first, then outwards), then, after each round, every slice across the longest side
            that the round changed.

    Returns:
        ``(K, J, I)`` bool mask.
    """
    shortest, _, longest = axes_by_extent(box, spacing)
    stages = 1 + settings.sparse_rounds
    short_logits = propagate_box_logits(along(shortest), box, shape, cancel, on_update)
    if progress:
        progress(1, stages)
    decoder = along(longest)
    rect, first, last = box_on_axis(box, longest)
    chosen = sparse_slices(first, last, settings.sparse_stride)
    decoder.prefetch(chosen, cancel=cancel)
    result = source = short_logits > 0
    for round_number in range(settings.sparse_rounds):
        logits = track_logits(decoder, source, rect, chosen, cancel)
        if logits is None:
            break
        rebox = 0.0
        if round_number >= settings.sparse_rebox_after:
            rebox = rebox_logits(along(shortest), source, box, cancel)
        long_logits = np.full(shape, NOT_SEGMENTED_LOGIT, dtype=np.float32)
        for index in range(first, last + 1):
            slice_into_volume(long_logits, longest, index, interpolate_logits(logits, index))
        combined = (short_logits + rebox + long_logits) > 0
        emit_changes(result, combined, longest, on_update)
        result = source = combined
        if progress:
            progress(2 + round_number, stages)
    return result
