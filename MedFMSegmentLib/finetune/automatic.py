"""Prompt-free segmentation with an adapter trained for it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import CancelledError, InputError
from ..geometry import slice_into_volume

BOX_SCALES = (1.0, 1.1, 1.2, 1.3, 1.45, 1.6)


@dataclass(frozen=True)
class AutomaticSettings:
    """How automatic mode places its boxes (see :func:`segment_automatic` for each field)."""

    box_threshold: float
    refine_iterations: int
    box_scales: tuple = (1.0,)
    flip: bool = False


#: Defaults for a volume's slices and for a single 2D image, each measured on one dataset.
#: Volumes: a first box from logits above -1 rather than 0 gave hippocampus +0.012
#: (``bench/results/automatic_hippocampus_cpu_bf16_s12.json``); on HC18 it lost 0.001-0.003.
#: :data:`BOX_SCALES` on two re-prompts gave HC18 +0.027 on one adapter and -0.006 on another,
#: at 5.5x the decoding time (``automatic_hc18_seed*_cpu_bf16_s13.json``): an option, not a default.
AUTOMATIC_DEFAULTS = {
    "volume": AutomaticSettings(box_threshold=-1.0, refine_iterations=1),
    "image": AutomaticSettings(box_threshold=0.0, refine_iterations=1),
}


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


@torch.inference_mode()
def segment_automatic(session, keep: str = "largest", refine_iterations: int | None = None,
                      box_threshold: float | None = None, box_scales: Sequence[float] | None = None,
                      flip: bool | None = None, progress=None, cancel=None) -> np.ndarray:
    """Segment every slice with no prompt, re-prompt it with a box, then keep the largest 3D component.

    Prompt-free output of a frozen-encoder adapter tends to be precise but incomplete, so a box
    drawn tightly around it can be too small. A lower ``box_threshold`` draws the first box around
    more of it; ``box_scales`` lets each re-prompt try the box at several scales and keep the one
    whose predicted IoU (the decoder's own score) is highest.
    Arguments left as None take :data:`AUTOMATIC_DEFAULTS` of the image's kind: a volume's slices
    or a single 2D image.

    Args:
        session: A :class:`~MedFMSegmentLib.predictor.SegmentationSession` on an adapted model.
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
            mirrored left-right (:meth:`~MedFMSegmentLib.predictor.SegmentationSession.mirrored`),
            at one more encoder call per slice.
        progress: Called with (slices done, slices in total).
        cancel: A ``threading.Event``; set it to stop with :class:`CancelledError`.

    Returns:
        ``(K, J, I)`` boolean mask.
    """
    from ..prompts import expand_box, mask_bbox, scale_box

    n = session.num_slices
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
        if cancel is not None and cancel.is_set():
            raise CancelledError("automatic segmentation cancelled")
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
            refined, _ = session.decode_best_box(index, boxes)
            if not refined.any():
                break
            plane = source = refined
        slice_into_volume(result, session.voxel_axis, index, plane)
        if progress is not None:
            progress(index + 1, n)
    if keep == "largest" and result.any():
        result = keep_largest_component(result)
    return result
