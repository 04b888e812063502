"""Following a structure's in-plane motion from one slice to the next (for 3D propagation).

LiteMedSAM fills whatever box it is given, so a box copied from the neighbouring slice cannot
follow a structure that moves across slices. Normalised cross-correlation of the two slices
inside the box finds the shift. There are two implementations of the same search, checked
against each other by the tests: NumPy on the CPU (faster there than the convolution) and a
grouped convolution for slices that live on a GPU, so that a GPU session tracks where its volume
is, with no copy to the host.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..prompts import Box2D

__all__ = ["MAX_PATCH_SIDE", "track_shift"]

#: The box content is subsampled to at most this many pixels per side before matching.
MAX_PATCH_SIDE = 64


def track_shift(before: np.ndarray | torch.Tensor, after: np.ndarray | torch.Tensor, box: Box2D,
                radius_cols: int, radius_rows: int) -> tuple[int, int]:
    """In-plane shift ``(columns, rows)`` that best maps ``before``'s content inside ``box`` onto ``after``.

    Args:
        before, after: ``(rows, cols)`` slices, same shape: NumPy arrays or tensors on any device.
        box: ``(col0, row0, col1, row1)`` inclusive, in slice pixels.
        radius_cols, radius_rows: Largest shift searched in each direction (pixels).

    Returns:
        The shift with the highest normalised cross-correlation; ties (flat regions) prefer no
        motion. ``(0, 0)`` when the box cannot move inside the slice.
    """
    rows, cols = after.shape
    c0, r0, c1, r1 = (int(round(v)) for v in box)
    height, width = r1 - r0 + 1, c1 - c0 + 1
    stride = max(1, max(height, width) // MAX_PATCH_SIDE)
    top, left = max(0, r0 - radius_rows), max(0, c0 - radius_cols)
    bottom, right = min(rows, r1 + radius_rows + 1), min(cols, c1 + radius_cols + 1)
    if bottom - top < height or right - left < width:
        return (0, 0)
    window = (r0, c0, height, width, stride, top, left, bottom, right)
    if isinstance(before, torch.Tensor) and before.device.type != "cpu":
        return _ncc_convolution(before, after, *window)
    if isinstance(before, torch.Tensor):
        before, after = before.numpy(), after.numpy()
    return _ncc_numpy(before, after, *window)


def _ncc_numpy(before: np.ndarray, after: np.ndarray, r0: int, c0: int, height: int, width: int, stride: int,
               top: int, left: int, bottom: int, right: int) -> tuple[int, int]:
    patch = before[r0:r0 + height:stride, c0:c0 + width:stride].astype(np.float64)
    patch = patch - patch.mean()
    region = after[top:bottom, left:right].astype(np.float64)
    # Every candidate window at once: one pass instead of a Python loop over (2r+1)^2 shifts.
    windows = np.lib.stride_tricks.sliding_window_view(region, (height, width))[:, :, ::stride, ::stride]
    numerator = np.einsum("abij,ij->ab", windows, patch)
    sums = windows.sum(axis=(2, 3))
    squares = np.einsum("abij,abij->ab", windows, windows)
    return _best_shift(numerator, sums, squares, patch, r0, c0, top, left)


def _ncc_convolution(before: torch.Tensor, after: torch.Tensor, r0: int, c0: int, height: int, width: int,
                     stride: int, top: int, left: int, bottom: int, right: int) -> tuple[int, int]:
    # float64: the centred sum of squares subtracts two large, nearly equal numbers.
    patch = before[r0:r0 + height:stride, c0:c0 + width:stride].double()
    patch = patch - patch.mean()
    region = after[top:bottom, left:right].double()
    # One grouped convolution gives, for every candidate shift, the patch-window dot product, the
    # window sum and the window sum of squares (dilation = the patch's subsampling stride).
    channels = torch.stack([region, region, region * region])[None]
    kernels = torch.stack([patch, torch.ones_like(patch), torch.ones_like(patch)])[:, None]
    cudnn = torch.backends.cudnn
    # Never autotuned: the patch and search sizes change from slice to slice, and with
    # cudnn.benchmark on (common in user code and in our GPU benchmark) each new shape would
    # trigger a fresh algorithm search for a convolution that is reused at most a few times.
    with cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=cudnn.deterministic,
                     allow_tf32=cudnn.allow_tf32):
        out = F.conv2d(channels, kernels, dilation=stride, groups=3)[0]
    out = out[:, : bottom - top - height + 1, : right - left - width + 1]
    return _best_shift(out[0], out[1], out[2], patch, r0, c0, top, left)


def _best_shift(numerator, sums, squares, patch, r0: int, c0: int, top: int, left: int) -> tuple[int, int]:
    """Scoring shared by NumPy arrays and tensors (a tensor costs one host transfer: the winning index)."""
    # The patch has zero mean, so each window's own mean drops out of the numerator, and its
    # centred sum of squares is sum(w^2) - sum(w)^2 / n: no centred copy of every window.
    centred_squares = (squares - sums * sums / (patch.shape[0] * patch.shape[1])).clip(min=0.0)
    scores = numerator / ((patch * patch).sum() * centred_squares + 1e-12) ** 0.5
    n_rows, n_cols = scores.shape
    drs = np.arange(top, top + n_rows) - r0
    dcs = np.arange(left, left + n_cols) - c0
    # Prefer no motion on ties (flat regions): a small penalty per pixel of shift.
    penalty = 1e-3 * (np.abs(drs)[:, None] + np.abs(dcs)[None, :])
    if isinstance(scores, torch.Tensor):
        penalty = torch.from_numpy(penalty).to(scores.device)
    best = int((scores - penalty).argmax())
    return (int(dcs[best % n_cols]), int(drs[best // n_cols]))
