"""Automatic (prompt-free) segmentation with an adapter trained for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..geometry import slice_from_volume, slice_into_volume
from ..prompts import expand_box, mask_bbox, scale_box
from .settings import ProgressCallback, UpdateCallback, check_cancel, emit_changes

if TYPE_CHECKING:
    from .session import SegmentationSession

__all__ = ["AUTOMATIC_DEFAULTS", "BOX_SCALES", "KEEP_COMPONENTS", "AutomaticSettings", "keep_largest_component", "segment_automatic"]

#: What automatic mode keeps of its 3D result (``keep``): the largest connected component, or all.
KEEP_COMPONENTS = ("largest", "all")
#: Re-prompt box scales worth trying (an option: several scales cost one decoder call with more boxes).
BOX_SCALES = (1.0, 1.1, 1.2, 1.3, 1.45, 1.6)


@dataclass(frozen=True)
class AutomaticSettings:
    """How automatic mode places its boxes (see :func:`segment_automatic` for each field)."""

    box_threshold: float
    refine_iterations: int
    box_scales: tuple = (1.0,)
    flip: bool = False


#: Defaults for a volume's slices and for a single 2D image, each measured on one dataset: a
#: first box from logits above -1 rather than 0 helped 3D MRI and slightly hurt 2D ultrasound;
#: :data:`BOX_SCALES` helped one adapter and hurt another at several times the decoding time.
AUTOMATIC_DEFAULTS = {
    "volume": AutomaticSettings(box_threshold=-1.0, refine_iterations=1),
    "image": AutomaticSettings(box_threshold=0.0, refine_iterations=1),
}


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a bool mask (the mask itself when it has one or none)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


@torch.inference_mode()
def segment_automatic(session: "SegmentationSession", keep: str = "largest", refine_iterations: int | None = None,
                      box_threshold: float | None = None, box_scales: Sequence[float] | None = None,
                      flip: bool | None = None, progress: ProgressCallback | None = None, cancel=None,
                      on_update: UpdateCallback | None = None) -> np.ndarray:
    """Segment every slice with no prompt, re-prompt it with a box, then keep the largest 3D component.

    Prompt-free output of a frozen-encoder adapter tends to be precise but incomplete, so a box
    drawn tightly around it can be too small. A lower ``box_threshold`` draws the first box around
    more of it; ``box_scales`` lets each re-prompt try the box at several scales and keep the one
    whose predicted IoU (the decoder's own score) is highest.
    Arguments left as None take :data:`AUTOMATIC_DEFAULTS` of the image's kind: a volume's slices
    or a single 2D image.

    Args:
        session: A :class:`~MedFMSegmentLib.inference.SegmentationSession` on an adapted model;
            its slices along its :attr:`~MedFMSegmentLib.inference.SegmentationSession.voxel_axis` are segmented.
        keep: ``"largest"`` keeps the largest 3D connected component; ``"all"`` keeps everything.
        refine_iterations: Times each slice is re-segmented from the box of its current mask
            (largest 2D component, scaled, plus the usual margin), starting from the prompt-free
            mask; 0 keeps the prompt-free output. SAM-family decoders are far better with a box
            than without one, and a rough mask is enough to place the box.
        box_threshold: Logit above which prompt-free output places the first box; below 0 the box
            also takes in pixels the decoder was unsure of.
        box_scales: Scales of the re-prompt box (about its centre) tried on each re-prompt, the
            decoder's predicted IoU picking one; ``(1.0,)`` re-prompts with the mask's own box.
        flip: Test-time flip: average each slice's prompt-free logits with those of the slice
            mirrored left-right (:meth:`~MedFMSegmentLib.inference.SegmentationSession.mirrored`),
            at one more encoder call per slice.
        progress: Called with (slices done, slices in total).
        cancel: A ``threading.Event``; set it to stop with :class:`CancelledError`.
        on_update: Called with ``(voxel_axis, index, plane)`` as each slice is written, then for
            the slices that keeping the largest component changes.

    An adapter whose held-out volumes showed its U-Net better (``session.model.automatic_net``)
    segments the volume with that network instead; the box settings then do not apply.

    Returns:
        ``(K, J, I)`` boolean mask.
    """
    n = session.num_slices
    axis = session.voxel_axis
    net = getattr(session.model, "automatic_net", None)
    if net is not None and net.spatial_dims == (2 if n == 1 else 3):  # else: the slice path below
        return _segment_with_net(session, keep, progress, cancel, on_update)
    defaults = AUTOMATIC_DEFAULTS["image" if n == 1 else "volume"]
    box_threshold = defaults.box_threshold if box_threshold is None else box_threshold
    refine_iterations = defaults.refine_iterations if refine_iterations is None else refine_iterations
    box_scales = defaults.box_scales if box_scales is None else tuple(box_scales)
    flip = defaults.flip if flip is None else bool(flip)
    if not box_scales:
        raise InputError("automatic mode needs at least one box scale")
    result = np.zeros(session.image.array.shape, dtype=bool)
    session.prefetch(range(n), cancel=cancel)
    mirror = session.mirrored() if flip else None
    if mirror is not None:
        mirror.prefetch(range(n), cancel=cancel)
    for index in range(n):
        check_cancel(cancel, "automatic segmentation")
        logits = session.prompt_free_logits(index)
        if mirror is not None:
            logits = (logits + mirror.prompt_free_logits(index)[:, ::-1]) / 2
        plane, source = logits > 0, logits > box_threshold
        for _ in range(refine_iterations):
            if not source.any():
                break
            tight = mask_bbox(keep_largest_component(source))
            boxes = [expand_box(scale_box(tight, f, plane.shape), session.box_margin(), plane.shape)
                     for f in box_scales]
            refined, _ = session.decode_best_box(index, boxes, automatic=True)  # the adapted decoder
            if not refined.any():
                break
            plane = source = refined
        slice_into_volume(result, axis, index, plane)
        if on_update is not None:
            on_update(axis, index, np.array(plane, dtype=bool))
        if progress is not None:
            progress(index + 1, n)
    if keep == "largest" and result.any():
        kept = keep_largest_component(result)
        emit_changes(result, kept, axis, on_update)
        result = kept
    return result


def _segment_with_net(session: "SegmentationSession", keep: str, progress, cancel, on_update) -> np.ndarray:
    """Automatic mode by the adapter's U-Net: one pass over the whole image, then as above."""
    check_cancel(cancel, "automatic segmentation")
    result = session.model.automatic_net.segment(session.image, session.intensity)
    if keep == "largest" and result.any():
        result = keep_largest_component(result)
    n, axis = session.num_slices, session.voxel_axis
    for index in range(n) if on_update is not None else ():  # every slice, as the slice path does
        on_update(axis, index, slice_from_volume(result, axis, index).copy())
    if progress is not None:
        progress(n, n)
    return result
