"""Slice prompting: one slice, a box and/or clicks, to a mask.

:class:`SliceDecoder` is bound to one voxel axis of one volume (its slices, their transform to
the model input, the decoder step whose buffers fit them). Boxes are ``(col0, row0, col1, row1)``
inclusive and clicks ``(col, row)``, both in slice pixels (see
:func:`~MedFMSegmentLib.geometry.to_slice_coords`); masks and logits are ``(rows, cols)``.
Models trained with boxes only (LiteMedSAM, MedSAM) get clicks as a box: :func:`clicks_to_box`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..backends import quiet_torch_threads
from ..decoder_step import DecoderStep
from ..errors import InputError
from ..prompts import Box2D, apply_click_constraints, components_touching, expand_box, mask_bbox
from .embeddings import SliceEmbedder
from .settings import PredictorSettings

__all__ = ["SliceDecoder", "clicks_to_box", "limit_by_negatives"]

Clicks = Sequence[Sequence[float]]


class SliceDecoder:
    """Decoder calls on the slices normal to one voxel axis.

    Args:
        embedder: Where the slices' embeddings come from.
        voxel_axis: 0 (I), 1 (J) or 2 (K): the axis the slices are normal to.
        settings: Margins, refinement and click-box sizes.
    """

    def __init__(self, embedder: SliceEmbedder, voxel_axis: int, settings: PredictorSettings) -> None:
        self.embedder = embedder
        self.model = embedder.model
        self.voxel_axis = voxel_axis
        self.settings = settings
        self.transform = embedder.transform(voxel_axis)
        self._step: DecoderStep | None = None

    @property
    def slice_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the slices."""
        return (self.transform.rows, self.transform.cols)

    @property
    def num_slices(self) -> int:
        return self.embedder.size[self.voxel_axis]

    def embedding(self, index: int) -> torch.Tensor:
        """``(1, C, 64, 64)`` embedding of slice ``index``, computed on first use."""
        return self.embedder.embedding(self.voxel_axis, index)

    def prefetch(self, indices: Sequence[int], cancel=None, progress=None) -> None:
        """Embed ``indices`` ahead where batching pays (see :meth:`SliceEmbedder.prefetch`)."""
        self.embedder.prefetch(self.voxel_axis, indices, progress=progress, cancel=cancel)

    def step(self) -> DecoderStep:
        """The propagation decoder step of these slices (its buffers fit them; on CUDA it holds a
        captured graph)."""
        if self._step is None:
            self._step = DecoderStep(self.model, self.transform)
        return self._step

    def box_margin(self, input_px: float | None = None) -> tuple[float, float]:
        """Margin ``(col, row)`` in slice pixels for ``input_px`` model-input pixels (default
        ``settings.box_margin_px``)."""
        m = self.settings.box_margin_px if input_px is None else input_px
        return (m / self.transform.scale_cols, m / self.transform.scale_rows)

    @torch.inference_mode()
    def predict(self, index: int, box: Box2D | None = None, positives: Clicks = (), negatives: Clicks = ()
                ) -> np.ndarray:
        """Segment slice ``index`` from a user's box and/or clicks: ``(rows, cols)`` bool mask.

        A user box gets ``user_box_margin_px``; a box-only model gets clicks as a box
        (:func:`clicks_to_box`); negative clicks then remove the components they fall on.
        """
        if box is None and not positives:
            raise InputError("a slice prompt needs a box or a positive click")
        if self.model.spec.trained_with_points and (positives or negatives):
            mask = self.decode(index, box, positives, negatives)
        else:
            if box is None:
                box = clicks_to_box(self, index, positives, negatives)
            else:
                box = expand_box(box, self.box_margin(self.settings.user_box_margin_px), self.slice_shape)
            mask = self.decode(index, box)
            mask = self.refine(index, mask, limit=box, iterations=self.settings.refine_iterations)
        return apply_click_constraints(mask, positives, negatives)

    def decode(self, index: int, box: Box2D | None = None, positives: Clicks = (), negatives: Clicks = (),
               automatic: bool = False) -> np.ndarray:
        """One decoder call: exactly this box (no margin, no refinement) and clicks, or no prompt
        at all (what adapters trained for automatic mode take). Returns a ``(rows, cols)`` bool mask.
        ``automatic``: the box is automatic mode's re-prompt (see :meth:`PromptableModel.decode`)."""
        embedding = self.embedding(index)
        device = self.model.device
        own_box = automatic and self.model.prompt_decoder is not None  # the step decodes user prompts
        if device.type == "cuda" and box is not None and not positives and not negatives and not own_box:
            mask, _ = self.step()(embedding, box)  # one CUDA graph replay (see DecoderStep)
            return mask.cpu().numpy()
        t = self.transform
        boxes = None if box is None else torch.from_numpy(t.box_to_input(box))[None].to(device)
        points = labels = None
        if positives or negatives:
            coords = t.points_to_input(np.array(list(positives) + list(negatives), dtype=np.float32))
            points = torch.from_numpy(coords)[None].to(device)
            labels = torch.tensor([[1] * len(positives) + [0] * len(negatives)], device=device)
        logits, _ = self.model.decode(embedding, boxes=boxes, points=points, point_labels=labels, automatic=automatic)
        with quiet_torch_threads(self.model):
            return (t.logits_to_slice(logits)[0] > 0).cpu().numpy()

    def decode_logits(self, index: int, box: Box2D) -> np.ndarray:
        """``(rows, cols)`` float32 logits of one decoder call with exactly this box;
        :meth:`decode` is ``logits > 0``."""
        step = self.step()
        step(self.embedding(index), box)
        return step.logits.cpu().numpy().astype(np.float32, copy=True)

    @torch.inference_mode()
    def prompt_free_logits(self, index: int) -> np.ndarray:
        """``(rows, cols)`` float32 logits of one decoder call with no prompt."""
        logits, _ = self.model.decode(self.embedding(index))
        with quiet_torch_threads(self.model):
            return self.transform.logits_to_slice(logits)[0].float().cpu().numpy()

    @torch.inference_mode()
    def decode_best_box(self, index: int, boxes: Sequence[Box2D], automatic: bool = False) -> tuple[np.ndarray, int]:
        """One decoder call with several candidate boxes (used as given); the decoder's own
        predicted IoU picks one. Returns ``(mask, position in boxes)``. ``automatic``: see
        :meth:`decode`."""
        if not boxes:
            raise InputError("decode_best_box needs at least one box")
        if len(boxes) == 1:
            return self.decode(index, boxes[0], automatic=automatic), 0
        t = self.transform
        inputs = torch.from_numpy(np.stack([t.box_to_input(b) for b in boxes])).to(self.model.device)
        logits, iou = self.model.decode(self.embedding(index), boxes=inputs, automatic=automatic)
        best = int(torch.argmax(iou[:, 0].float()))
        with quiet_torch_threads(self.model):
            return (t.logits_to_slice(logits[best:best + 1])[0] > 0).cpu().numpy(), best

    def refine(self, index: int, mask: np.ndarray, limit: Box2D | None, iterations: int) -> np.ndarray:
        """Re-prompt with the mask's own box plus margin: a loose box becomes a trained-like one."""
        for _ in range(iterations):
            tight = mask_bbox(mask)
            if tight is None:
                break
            refined = self.decode(index, expand_box(tight, self.box_margin(), mask.shape, limit))
            if not refined.any():
                break
            mask = refined
        return mask


def clicks_to_box(decoder: SliceDecoder, index: int, positives: Clicks, negatives: Clicks) -> Box2D:
    """Turn clicks into a box for a box-only model (LiteMedSAM gives Dice 0 on a bare click).

    Boxes of ``settings.click_box_sizes`` are centred on the clicks' extent; each is decoded,
    tightened to its mask's own box plus margin and decoded again. The box whose mask agrees best
    with the other sizes' masks (mean IoU) wins: a structure that is really there comes out the
    same from several sizes, while too small boxes give arbitrary blobs and too large ones swallow
    neighbours. All candidates share one embedding, so this costs decoder calls only. Negative
    clicks pull box sides in so they stay outside.
    """
    shape = decoder.slice_shape
    transform, size = decoder.transform, decoder.model.image_size
    pts = np.asarray(positives, dtype=float).reshape(-1, 2)
    extent = (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())
    candidates: list[tuple[Box2D, np.ndarray]] = []
    for fraction in decoder.settings.click_box_sizes:
        half = (fraction * size / transform.scale_cols / 2, fraction * size / transform.scale_rows / 2)
        box = expand_box(limit_by_negatives(expand_box(extent, half, shape), pts, negatives), 0, shape)
        tight = mask_bbox(components_touching(decoder.decode(index, box), pts))
        if tight is None:
            continue
        box = expand_box(limit_by_negatives(expand_box(tight, decoder.box_margin(), shape), pts, negatives), 0, shape)
        mask = components_touching(decoder.decode(index, box), pts)
        if mask.any():
            candidates.append((box, mask))
    if not candidates:
        return expand_box(extent, decoder.box_margin(), shape)
    if len(candidates) == 1:
        return candidates[0][0]
    masks = [m for _, m in candidates]
    agreement = [np.mean([_mask_iou(m, other) for other in masks if other is not m]) for m in masks]
    return candidates[int(np.argmax(agreement))][0]


def limit_by_negatives(box: Box2D, positives: np.ndarray, negatives: Clicks) -> Box2D:
    """Pull box sides in so that no negative click lies inside the box, on the side away from
    the positive clicks ``(N, 2)``, giving up the least area each time."""
    c0, r0, c1, r1 = box
    pc0, pr0 = positives[:, 0].min(), positives[:, 1].min()
    pc1, pr1 = positives[:, 0].max(), positives[:, 1].max()
    for nc, nr in negatives:
        if not (c0 <= nc <= c1 and r0 <= nr <= r1):
            continue
        options = []
        if nc < pc0:
            options.append(((nc + 1 - c0) * (r1 - r0), (nc + 1, r0, c1, r1)))
        if nc > pc1:
            options.append(((c1 - nc + 1) * (r1 - r0), (c0, r0, nc - 1, r1)))
        if nr < pr0:
            options.append(((nr + 1 - r0) * (c1 - c0), (c0, nr + 1, c1, r1)))
        if nr > pr1:
            options.append(((r1 - nr + 1) * (c1 - c0), (c0, r0, c1, nr - 1)))
        if options:
            c0, r0, c1, r1 = min(options)[1]
    return (c0, r0, c1, r1)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
