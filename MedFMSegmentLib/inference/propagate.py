"""The ``propagate`` strategy: from a segmented slice, slice by slice along one voxel axis.

Each slice is prompted with its neighbour's mask box (plus margin), shifted by the structure's
in-plane motion (:func:`~MedFMSegmentLib.inference.tracking.track_shift`), and the walk stops
where the mask gets too small or stops overlapping its neighbour's. Masks stay on the model's
device (:class:`~MedFMSegmentLib.decoder_step.DecoderStep`); the host sees each slice's area,
overlap and box, and the mask once, when it is written.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np
import torch

from ..decoder_step import StepStats
from ..geometry import box_on_axis, slice_into_volume
from ..prompts import Box2D, apply_click_constraints, expand_box, mask_bbox
from .settings import NOT_SEGMENTED_LOGIT, ProgressCallback, UpdateCallback, check_cancel
from .slices import SliceDecoder
from .tracking import track_shift

__all__ = ["ClicksOn", "no_clicks", "propagate", "propagate_box_logits", "tracked_shift"]

#: ``clicks_on(index, kind)``: the clicks ``(col, row)`` of kind ``"pos"`` or ``"neg"`` on slice ``index``.
ClicksOn = Callable[[int, str], list]


def no_clicks(index: int, kind: str) -> list:
    """A :data:`ClicksOn` for prompts without clicks."""
    return []


def tracked_shift(decoder: SliceDecoder, source: int, target: int, box: Box2D) -> tuple[int, int]:
    """In-plane shift ``(columns, rows)`` that best maps the box's content on slice ``source``
    onto ``target``, searching ``track_radius_px`` model-input pixels (1 to 8 slice pixels)."""
    embedder, axis, transform = decoder.embedder, decoder.voxel_axis, decoder.transform
    radius = decoder.settings.track_radius_px
    radius_c = int(np.clip(round(radius / transform.scale_cols), 1, 8))
    radius_r = int(np.clip(round(radius / transform.scale_rows), 1, 8))
    return track_shift(embedder.slice_tensor(axis, source), embedder.slice_tensor(axis, target), box,
                       radius_c, radius_r)


def propagate(decoder: SliceDecoder, result: np.ndarray, start: int, start_mask: np.ndarray,
              limits: tuple[int, int], limit_box: Box2D | None = None, clicks_on: ClicksOn = no_clicks,
              progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
              logits_out: np.ndarray | None = None, on_update: UpdateCallback | None = None) -> None:
    """Walk from slice ``start`` towards both ends of ``limits``, each slice prompted by its neighbour.

    Args:
        decoder: The slices of the axis to walk along.
        result: ``(K, J, I)`` bool mask written slice by slice (``start`` is not written here).
        start, start_mask: The segmented slice and its ``(rows, cols)`` mask.
        limits: First and last slice index the walk may reach.
        limit_box: Boxes never leave this rectangle ``(col0, row0, col1, row1)`` (None: the slice).
        clicks_on: Clicks that constrain the slices they lie on.
        progress: Called with (slices done, slices planned).
        cancel: Set it to stop with :class:`~MedFMSegmentLib.errors.CancelledError`.
        logits_out: Optional ``(K, J, I)`` float array that receives each written slice's logits.
        on_update: Called with ``(voxel_axis, index, plane)`` after each slice is written, nearest
            to ``start`` first on each side (the +1 side before the -1 side).
    """
    axis, settings, shape = decoder.voxel_axis, decoder.settings, decoder.slice_shape
    planned = limits[1] - limits[0] + 1
    done = 1
    decode = decoder.step()
    device = decoder.model.device
    start_tensor = torch.from_numpy(np.ascontiguousarray(start_mask)).to(device)
    for step in (1, -1):
        decode.set_previous(start_tensor)
        previous_area, previous_box = int(start_mask.sum()), mask_bbox(start_mask)
        index = start + step
        while limits[0] <= index <= limits[1] and previous_area >= settings.min_area_px:
            check_cancel(cancel)
            box = expand_box(previous_box, decoder.box_margin(), shape, limit_box)
            if settings.track_radius_px > 0:
                dc, dr = tracked_shift(decoder, index - step, index, box)
                box = expand_box((box[0] + dc, box[1] + dr, box[2] + dc, box[3] + dr), 0, shape, limit_box)
            mask, stats = decode(decoder.embedding(index), box)
            logits = decode.logits
            for _ in range(settings.refine_iterations):
                if stats.box is None:
                    break
                kept = (mask.clone(), stats, logits.clone())  # the step's buffers are reused
                mask, stats = decode(decoder.embedding(index), expand_box(stats.box, decoder.box_margin(), shape,
                                                                          limit_box))
                logits = decode.logits
                if stats.area == 0:
                    mask, stats, logits = kept
                    break
            positives, negatives = clicks_on(index, "pos"), clicks_on(index, "neg")
            if positives or negatives:
                plane = apply_click_constraints(mask.cpu().numpy(), positives, negatives)
                mask = torch.from_numpy(plane).to(device)
                stats = StepStats(int(plane.sum()), int((mask & decode.previous).sum()), mask_bbox(plane))
            overlap = stats.overlap / max(1, min(stats.area, previous_area))
            if stats.area < settings.min_area_px or overlap < settings.min_overlap:
                break
            plane = mask.cpu().numpy()
            slice_into_volume(result, axis, index, plane)
            if on_update is not None:
                on_update(axis, index, plane.copy())
            if logits_out is not None:
                slice_into_volume(logits_out, axis, index, logits.cpu().numpy())
            decode.set_previous(mask)
            previous_area, previous_box = stats.area, stats.box
            index += step
            done += 1
            if progress:
                progress(done, planned)


def propagate_box_logits(decoder: SliceDecoder, box: Sequence[float], shape: tuple[int, int, int],
                         cancel: threading.Event | None = None,
                         on_update: UpdateCallback | None = None) -> np.ndarray:
    """The ``propagate`` strategy for a 3D voxel ``box`` along the decoder's axis, as ``(K, J, I)``
    logits of array ``shape``: the decoder's logits on every slice it segmented,
    :data:`NOT_SEGMENTED_LOGIT` elsewhere.

    The middle slice gets the box's own rectangle plus ``user_box_margin_px`` (no refinement),
    the others their neighbour's mask box. ``on_update`` sees the middle slice first, then each
    propagated slice as it is written (their planes are these logits ``> 0``).
    """
    axis = decoder.voxel_axis
    rect, first, last = box_on_axis(box, axis)
    decoder.prefetch(range(first, last + 1), cancel=cancel)
    logits = np.full(shape, NOT_SEGMENTED_LOGIT, dtype=np.float32)
    start = (first + last) // 2
    start_logits = decoder.decode_logits(
        start, expand_box(rect, decoder.box_margin(decoder.settings.user_box_margin_px), decoder.slice_shape))
    slice_into_volume(logits, axis, start, start_logits)
    if on_update is not None:
        on_update(axis, start, start_logits > 0)
    result = np.zeros(shape, dtype=bool)
    propagate(decoder, result, start, start_logits > 0, (first, last), rect, cancel=cancel, logits_out=logits,
              on_update=on_update)
    return logits
