"""Settings of prompted inference, the registries of its choices, and its callback types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import CancelledError, InputError
from ..geometry import array_axis, slice_from_volume

__all__ = ["AXES", "BOX3D_STRATEGIES", "DEFAULT_AXIS", "NOT_SEGMENTED_LOGIT", "PredictorSettings", "ProgressCallback",
           "UpdateCallback", "check_cancel", "emit_changes"]

#: ``progress(done, planned)``: slices (or stages) finished so far and planned in all.
ProgressCallback = Callable[[int, int], None]
#: ``on_update(voxel_axis, index, plane)``: slice ``index`` normal to ``voxel_axis`` of the result
#: now holds the bool ``plane`` (in :func:`~MedFMSegmentLib.geometry.slice_from_volume`'s layout).
UpdateCallback = Callable[[int, int, np.ndarray], None]

#: Logit written where a strategy did not segment a slice (sigmoid ~2e-9).
NOT_SEGMENTED_LOGIT = -20.0
#: How a box spanning several slices on every axis is segmented (see :class:`PredictorSettings`).
BOX3D_STRATEGIES = ("auto", "propagate", "consensus", "sparse")
#: Slicing axes a session accepts by name (a voxel axis number 0, 1, 2 is accepted too).
AXES = ("auto", "axial", "coronal", "sagittal")
#: The axis a session slices along unless told (``auto``: see :func:`~MedFMSegmentLib.inference.choose_axis`).
DEFAULT_AXIS = "auto"


@dataclass
class PredictorSettings:
    """Tunable behaviour of box refinement, click handling and 3D propagation.

    Attributes:
        box_margin_px: Margin (model-input pixels) added around a mask's tight box when it is
            turned back into a prompt; LiteMedSAM was trained on boxes a few pixels loose.
        user_box_margin_px: Margin (model-input pixels) added to boxes the user gives, for the
            same reason: a tight box scores lower than the same box a few pixels looser.
        refine_iterations: Times a box is replaced by the predicted mask's own box plus margin
            (0 by default: it lowered tight-box Dice on 2D ultrasound).
        click_box_sizes: Sides of the candidate boxes centred on clicks, as fractions of the
            model input (see :func:`~MedFMSegmentLib.inference.slices.clicks_to_box`).
        track_radius_px: Search radius (model-input pixels) for following a structure's in-plane
            motion from slice to slice during propagation (0 turns tracking off).
        min_area_px: Propagation stops on a slice whose mask has fewer pixels.
        min_overlap: Propagation stops when a slice's mask covers less than this fraction of the
            previous slice's mask (the model jumped to another structure).
        cache_bytes: Memory budget of the embedding cache (None: 1 GiB on a CPU; on a GPU a
            quarter of its memory, at most 8 GiB, so that a large CT's embeddings stay cached).
        embed_batch_size: Slices embedded ahead in batches before a 3D or automatic run
            (None: 16 on a GPU, 0 = lazily on a CPU).
        box3d_strategy: One of :data:`BOX3D_STRATEGIES`: ``"propagate"`` (slice by slice along
            one axis), ``"consensus"`` (three axes combined, about 4x the encoder work: see
            :mod:`~MedFMSegmentLib.inference.consensus`), ``"sparse"`` (two axes, a fraction of the
            longest side's slices: :mod:`~MedFMSegmentLib.inference.sparse`), or ``"auto"``: consensus for
            a box whose sides sum to at most ``consensus_max_slices`` voxels, else propagate.
        consensus_rounds: Box re-placement rounds of the consensus strategy (decoder calls only,
            on slices already embedded).
        consensus_max_slices: The ``"auto"`` strategy's limit: the box's sides in voxels, summed
            (the slices consensus embeds); it bounds consensus's encoder time.
        consensus_three_axis_rounds: Further consensus rounds that also re-box the box's middle
            axis (decoder calls only).
        sparse_stride: The ``sparse`` strategy embeds every this many slices (1: all of them).
        sparse_rounds: Box track re-placement rounds of the ``sparse`` strategy (decoder calls only).
        sparse_rebox_after: From this round on, ``sparse`` also re-boxes the shortest side.
    """

    box_margin_px: float = 5.0
    user_box_margin_px: float = 3.0
    refine_iterations: int = 0
    click_box_sizes: tuple[float, ...] = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
    min_area_px: int = 3
    track_radius_px: float = 15.0
    min_overlap: float = 0.3
    cache_bytes: int | None = None
    embed_batch_size: int | None = None
    box3d_strategy: str = "auto"
    consensus_max_slices: int = 192
    consensus_rounds: int = 6
    consensus_three_axis_rounds: int = 6
    sparse_stride: int = 4
    sparse_rounds: int = 6
    sparse_rebox_after: int = 3

    def __post_init__(self) -> None:
        if self.box3d_strategy not in BOX3D_STRATEGIES:
            raise InputError(f"3D box strategy must be one of {', '.join(BOX3D_STRATEGIES)}, "
                             f"got {self.box3d_strategy!r}")
        if self.consensus_max_slices < 0:
            raise InputError(f"consensus max slices must be 0 or more, got {self.consensus_max_slices}")
        if self.consensus_rounds < 0:
            raise InputError(f"consensus rounds must be 0 or more, got {self.consensus_rounds}")
        if self.consensus_three_axis_rounds < 0:
            raise InputError(f"consensus three-axis rounds must be 0 or more, got {self.consensus_three_axis_rounds}")
        if self.sparse_stride < 1 or self.sparse_rounds < 0 or self.sparse_rebox_after < 0:
            raise InputError(f"sparse stride must be 1 or more, rounds and rebox-after 0 or more, got "
                             f"{self.sparse_stride}, {self.sparse_rounds}, {self.sparse_rebox_after}")

    def batch_size_for(self, device: torch.device) -> int:
        """Slices embedded ahead per batch: 16 on a GPU, 0 (lazily, one by one) on a CPU, where
        batching does not pay and propagation may stop before the planned range ends."""
        if self.embed_batch_size is not None:
            return self.embed_batch_size
        return 16 if device.type == "cuda" else 0

    def cache_bytes_for(self, device: torch.device) -> int:
        """Embedding cache budget on ``device`` (see ``cache_bytes``)."""
        if self.cache_bytes is not None:
            return self.cache_bytes
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            return int(min(8 << 30, total // 4))
        return 1 << 30

    def strategy_for(self, box: tuple[float, ...]) -> str:
        """The strategy :attr:`box3d_strategy` means for this voxel ``box`` (i0, j0, k0, i1, j1,
        k1): itself, or for ``"auto"`` consensus when the box's three sides in voxels sum to at
        most :attr:`consensus_max_slices`, else propagate."""
        if self.box3d_strategy == "auto":
            slices = sum(int(round(box[a + 3])) - int(round(box[a])) + 1 for a in range(3))
            return "consensus" if slices <= self.consensus_max_slices else "propagate"
        return self.box3d_strategy

    def uses_consensus(self, box: tuple[float, ...]) -> bool:
        """Whether :attr:`box3d_strategy` means consensus for this voxel ``box``."""
        return self.strategy_for(box) == "consensus"


def check_cancel(cancel, what: str = "segmentation") -> None:
    """Raise :class:`CancelledError` when the ``threading.Event`` ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise CancelledError(f"{what} cancelled")


def emit_changes(before: np.ndarray, after: np.ndarray, voxel_axis: int, on_update: UpdateCallback | None) -> None:
    """Call ``on_update(voxel_axis, index, plane)`` with ``after``'s plane for every slice normal
    to ``voxel_axis`` where the ``(K, J, I)`` masks ``before`` and ``after`` differ."""
    if on_update is None:
        return
    other = tuple(a for a in range(3) if a != array_axis(voxel_axis))
    for index in np.flatnonzero((before != after).any(axis=other)):
        on_update(voxel_axis, int(index), slice_from_volume(after, voxel_axis, int(index)).copy())
