"""The ``consensus`` strategy: a 3D box segmented along all three voxel axes, combined.

1. Propagate across the box's shortest physical side (kept as logits) and across its middle side
   (kept as a mask).
2. On the slices across the longest side a compact structure is a blob that the model segments
   well from a tight box. Those boxes are read from where the two propagations agree, smoothed
   along the slices (:func:`~MedFMSegmentLib.prompts.smooth_box_track`), decoded, and the logits
   added to the first propagation's.
3. Step 2 is repeated from the combined mask (``consensus_rounds`` times in all).
4. Then ``consensus_three_axis_rounds`` more rounds in which each slice across the middle side is
   also decoded with the combined mask's own box on that slice (:func:`rebox_logits`), and its
   logits join the sum: boxes from the combined mask are far closer than those the middle-side
   propagation placed from its neighbours. A slice where the combined mask is empty adds
   :data:`NOT_SEGMENTED_LOGIT`, so it stays empty.

It embeds the box's slices along all three axes (about 4x the ``propagate`` strategy's encoder
work); every round after the first two propagations costs decoder calls only.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from ..geometry import axes_by_extent, box_on_axis, slice_from_volume, slice_into_volume
from ..prompts import expand_box, mask_bbox, smooth_box_track
from .propagate import propagate_box_logits
from .settings import (NOT_SEGMENTED_LOGIT, PredictorSettings, ProgressCallback, UpdateCallback, check_cancel,
                       emit_changes)
from .slices import SliceDecoder

__all__ = ["rebox_logits", "segment_box_consensus", "track_logits"]


def segment_box_consensus(along: Callable[[int], SliceDecoder], box: Sequence[float], shape: tuple[int, int, int],
                          spacing: Sequence[float], settings: PredictorSettings,
                          progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
                          on_update: UpdateCallback | None = None) -> np.ndarray:
    """Segment the voxel ``box`` (i0, j0, k0, i1, j1, k1) by consensus of the three axes.

    Args:
        along: The :class:`SliceDecoder` of a voxel axis.
        box: The 3D box, spanning several slices on every axis.
        shape: ``(K, J, I)`` array shape of the volume; ``spacing`` its voxel size ``(I, J, K)``.
        settings: The rounds to run.
        progress: Called with (stages done, stages planned).
        cancel: Set it to stop with :class:`~MedFMSegmentLib.errors.CancelledError`.
        on_update: Sees the first propagation's slices as they are written (prompted slice first),
            then, after each round, every slice across the longest side that the round changed.

    Returns:
        ``(K, J, I)`` bool mask.
    """
    shortest, middle, longest = axes_by_extent(box, spacing)
    rounds = settings.consensus_rounds + settings.consensus_three_axis_rounds
    stages = 2 + rounds
    short_logits = propagate_box_logits(along(shortest), box, shape, cancel, on_update)
    if progress:
        progress(1, stages)
    source = (short_logits > 0) & (propagate_box_logits(along(middle), box, shape, cancel) > 0)
    if progress:
        progress(2, stages)
    decoder = along(longest)
    rect, first, last = box_on_axis(box, longest)
    targets = list(range(first, last + 1))
    decoder.prefetch(targets, cancel=cancel)
    result = short_logits > 0
    for round_number in range(rounds):
        tracked = track_logits(decoder, source, rect, targets, cancel)
        if tracked is None:
            break
        middle_logits = 0.0
        if round_number >= settings.consensus_rounds:
            middle_logits = rebox_logits(along(middle), source, box, cancel)
        long_logits = np.full(shape, NOT_SEGMENTED_LOGIT, dtype=np.float32)
        for index, logits in tracked.items():
            slice_into_volume(long_logits, longest, index, logits)
        combined = (short_logits + middle_logits + long_logits) > 0
        emit_changes(result, combined, longest, on_update)
        result = source = combined
        if progress:
            progress(3 + round_number, stages)
    return result


def track_logits(decoder: SliceDecoder, source: np.ndarray, rect: Sequence[float], slices: Sequence[int],
                 cancel: threading.Event | None = None) -> dict[int, np.ndarray] | None:
    """Logits of each of ``slices`` along the decoder's axis, decoded with a smooth box track
    fitted to ``source``'s boxes on them (plus ``box_margin_px``, clipped to the 3D box's ``rect``);
    a slice where the track leaves the 3D box gets :data:`NOT_SEGMENTED_LOGIT`. None when
    ``source`` is empty on all of them."""
    axis = decoder.voxel_axis
    seen = [(index, mask_bbox(slice_from_volume(source, axis, index))) for index in slices]
    seen = [(index, b) for index, b in seen if b is not None]
    if not seen:
        return None
    boxes = smooth_box_track([i for i, _ in seen], [b for _, b in seen], list(slices))
    logits = {}
    for index, b in zip(slices, boxes):
        check_cancel(cancel)
        slice_box = expand_box(b, decoder.box_margin(), decoder.slice_shape, rect)
        if slice_box[0] > slice_box[2] or slice_box[1] > slice_box[3]:  # the track left the 3D box
            logits[index] = np.full(decoder.slice_shape, NOT_SEGMENTED_LOGIT, np.float32)
        else:
            logits[index] = decoder.decode_logits(index, slice_box)
    return logits


def rebox_logits(decoder: SliceDecoder, mask: np.ndarray, box: Sequence[float],
                 cancel: threading.Event | None = None) -> np.ndarray:
    """``(K, J, I)`` logits of every slice along the decoder's axis within the 3D ``box`` where
    ``mask`` has voxels, each decoded with the mask's own box on it (plus ``box_margin_px``,
    clipped to the 3D box); :data:`NOT_SEGMENTED_LOGIT` elsewhere."""
    axis = decoder.voxel_axis
    rect, first, last = box_on_axis(box, axis)
    logits = np.full(mask.shape, NOT_SEGMENTED_LOGIT, dtype=np.float32)
    for index in range(first, last + 1):
        check_cancel(cancel)
        tight = mask_bbox(slice_from_volume(mask, axis, index))
        if tight is None:
            continue
        slice_box = expand_box(tight, decoder.box_margin(), decoder.slice_shape, rect)
        slice_into_volume(logits, axis, index, decoder.decode_logits(index, slice_box))
    return logits
