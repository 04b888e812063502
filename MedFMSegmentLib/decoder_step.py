"""The decoder step of 3D propagation: box -> mask on the model's device, plus its statistics.

Propagation needs, after every slice, a handful of numbers on the host (the mask's area, its
overlap with the previous slice's mask, its tight box) and the mask itself only when it is
written. :class:`DecoderStep` keeps the mask where the model runs and returns those numbers in
one small transfer. On CUDA the whole step (prompt encoder, mask decoder, upsampling to the
slice, statistics) is captured once in a CUDA graph and replayed: LiteMedSAM's decoder is a few
hundred small kernels, whose launches cost more than their work (``python -m bench gpu`` times
the eager call against the graphed step).
Without CUDA, or if capture fails, the same computation runs eagerly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backends import quiet_torch_threads
from .models import PromptableModel
from .preprocessing import SliceTransform
from .prompts import Box2D

__all__ = ["DecoderStep", "StepStats", "mask_statistics", "to_stats"]


class StepStats(NamedTuple):
    """What propagation decides on, for one decoded mask (slice pixels)."""

    area: int
    overlap: int  # voxels shared with the previous slice's mask
    box: Box2D | None  # tight ``(col0, row0, col1, row1)``, None when the mask is empty


def mask_statistics(mask: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``[area, overlap, col0, row0, col1, row1]`` of a ``(rows, cols)`` bool mask, on its device."""
    rows_any = mask.any(dim=1).to(torch.int32)
    cols_any = mask.any(dim=0).to(torch.int32)
    # argmax returns the first maximum: the first and (on the flipped vector) the last set row/column.
    r0, r1 = rows_any.argmax(), mask.shape[0] - 1 - rows_any.flip(0).argmax()
    c0, c1 = cols_any.argmax(), mask.shape[1] - 1 - cols_any.flip(0).argmax()
    area = mask.sum()
    overlap = (mask & previous).sum()
    return torch.stack([area, overlap, c0, r0, c1, r1])


def to_stats(values: torch.Tensor) -> StepStats:
    area, overlap, c0, r0, c1, r1 = (int(v) for v in values.tolist())
    return StepStats(area, overlap, (float(c0), float(r0), float(c1), float(r1)) if area else None)


class DecoderStep:
    """Decode one box on one slice embedding; the mask stays on the model's device.

    Args:
        model: The promptable model (its device is where masks live).
        transform: The slice <-> model-input mapping of the slices being decoded.
        use_graph: Capture the step in a CUDA graph (default: on CUDA devices).

    The returned mask is a buffer that the next call overwrites: copy it (``.clone()``,
    ``.cpu()``) or hand it to :meth:`set_previous` before calling again.
    """

    def __init__(self, model: PromptableModel, transform: SliceTransform, use_graph: bool | None = None) -> None:
        self.model = model
        self.transform = transform
        device = model.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self._embedding: torch.Tensor | None = None
        self._box = torch.zeros(1, 4, device=device)
        self._previous = torch.zeros(transform.rows, transform.cols, dtype=torch.bool, device=device)
        self._graph = None
        self._outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._logits: torch.Tensor | None = None
        #: Why the CUDA graph is not used, when capture was tried and failed (else None).
        self.graph_error: str | None = None

    @property
    def graphed(self) -> bool:
        return self._graph is not None

    @property
    def logits(self) -> torch.Tensor:
        """``(rows, cols)`` float logits of the last call (``mask`` is ``logits > 0``); the same
        reused buffer caveat as the mask applies."""
        return self._logits

    @property
    def previous(self) -> torch.Tensor:
        """The mask set by :meth:`set_previous` (on the model's device)."""
        return self._previous

    @torch.inference_mode()
    def set_previous(self, mask: torch.Tensor) -> None:
        """The mask that the next calls' ``overlap`` is measured against (copied).

        In inference mode because the buffers may have been made in it (a step first used by an
        inference-mode caller), and such tensors can only be updated in place there.
        """
        self._previous.copy_(mask)

    @torch.inference_mode()
    def __call__(self, embedding: torch.Tensor, box: Box2D) -> tuple[torch.Tensor, StepStats]:
        """Decode ``box`` (slice pixels, used as given) on ``embedding`` ``(1, C, h, w)``.

        Returns:
            ``(mask, stats)``: the ``(rows, cols)`` bool mask on the model's device (a reused
            buffer, see the class note) and its :class:`StepStats`.
        """
        if self._embedding is None or self._embedding.shape != embedding.shape:
            self._embedding = torch.empty_like(embedding)
            self._graph = self._outputs = None
        with quiet_torch_threads(self.model):  # the decoder graph starts right after these copies
            self._embedding.copy_(embedding)
            self._box.copy_(torch.from_numpy(self.transform.box_to_input(box))[None])
        if self.use_graph and self._graph is None and self.graph_error is None:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
            self._logits, mask, values = self._outputs
        else:
            self._logits, mask, values = self._compute()
        return mask, to_stats(values)

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, _ = self.model.decode(self._embedding, boxes=self._box)
        with quiet_torch_threads(self.model):  # the next step's decoder graph may follow at once
            logits = self.transform.logits_to_slice(logits)[0]
            mask = logits > 0
            return logits, mask, mask_statistics(mask, self._previous)

    def _capture(self) -> None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs need
                for _ in range(2):
                    self._compute()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._outputs = self._compute()
            self._graph = graph
        except Exception as exc:  # noqa: BLE001 - the graph is only a speed-up; eager gives the same masks
            self.graph_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._graph = self._outputs = None
