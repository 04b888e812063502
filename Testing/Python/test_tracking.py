"""In-plane motion tracking: the NumPy search (CPU) and the convolution search (GPU) agree."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from MedFMSegmentLib.inference.tracking import _ncc_convolution, track_shift


def _moved_pair(rng, rows, cols, shift, smoothing):
    base = gaussian_filter(rng.random((rows, cols)), smoothing).astype(np.float32)
    moved = np.roll(base, shift, axis=(0, 1)) + 0.01 * rng.random((rows, cols)).astype(np.float32)
    return base, moved


def test_known_shift_is_found_on_arrays_and_tensors():
    rng = np.random.default_rng(1)
    before, after = _moved_pair(rng, 120, 100, (2, -5), 2.0)
    box = (30.0, 40.0, 70.0, 80.0)
    assert track_shift(before, after, box, 8, 8) == (-5, 2)
    assert track_shift(torch.from_numpy(before), torch.from_numpy(after), box, 8, 8) == (-5, 2)
    assert track_shift(before, after, (0.0, 0.0, 99.0, 119.0), 8, 8) == (0, 0)  # fills the slice


def test_convolution_search_matches_numpy_search_on_random_boxes():
    """The GPU implementation, run here on CPU tensors, picks the same shift as the CPU one,
    subsampled patches (stride > 1) and boxes at the slice border included."""
    rng = np.random.default_rng(0)
    strides = set()
    for _ in range(60):
        rows, cols = (int(v) for v in rng.integers(40, 420, 2))
        before, after = _moved_pair(rng, rows, cols, tuple(int(v) for v in rng.integers(-6, 7, 2)),
                                    float(rng.uniform(0.5, 4)))
        c0, r0 = int(rng.integers(0, cols - 10)), int(rng.integers(0, rows - 10))
        c1, r1 = int(rng.integers(c0 + 5, cols)), int(rng.integers(r0 + 5, rows))
        radius_c, radius_r = (int(v) for v in rng.integers(1, 9, 2))
        height, width = r1 - r0 + 1, c1 - c0 + 1
        stride = max(1, max(height, width) // 64)
        top, left = max(0, r0 - radius_r), max(0, c0 - radius_c)
        bottom, right = min(rows, r1 + radius_r + 1), min(cols, c1 + radius_c + 1)
        expected = track_shift(before, after, (c0, r0, c1, r1), radius_c, radius_r)
        got = _ncc_convolution(torch.from_numpy(before), torch.from_numpy(after), r0, c0, height, width, stride,
                               top, left, bottom, right)
        assert got == expected, f"box {(c0, r0, c1, r1)} in {rows}x{cols}"
        strides.add(stride)
    assert len(strides) >= 3  # the dilated (subsampled) case was exercised
