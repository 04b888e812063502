"""Box helpers: the smoothed box track used by the consensus 3D-box strategy."""

from __future__ import annotations

import numpy as np
import pytest

from MedFMSegmentLib.prompts import smooth_box_track


def test_smooth_box_track_recovers_a_quadratic_path_with_the_median_size():
    slices = np.arange(10, 30)
    col = 40 + 0.5 * (slices - 20) ** 2 / 10
    row = 25 - 0.8 * (slices - 20)
    rng = np.random.default_rng(0)
    widths = 12 + rng.integers(-3, 4, slices.size)  # noisy sizes: the median wins
    boxes = [(c - w / 2, r - 4, c + w / 2, r + 4) for c, r, w in zip(col, row, widths)]
    seen = slices[::2]
    track = smooth_box_track(seen, [boxes[i] for i in range(0, 20, 2)], slices)
    assert len(track) == slices.size
    centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in track])
    np.testing.assert_allclose(centres[:, 0], col, atol=1e-6)
    np.testing.assert_allclose(centres[:, 1], row, atol=1e-6)
    sizes = {(round(b[2] - b[0], 6), round(b[3] - b[1], 6)) for b in track}
    assert sizes == {(float(np.median(widths[::2])), 8.0)}


def test_smooth_box_track_with_few_slices_and_none():
    np.testing.assert_allclose(smooth_box_track([5], [(1.0, 2.0, 5.0, 8.0)], [4, 5, 6]), [(1.0, 2.0, 5.0, 8.0)] * 3)
    line = smooth_box_track([0, 2], [(0.0, 0.0, 2.0, 2.0), (4.0, 0.0, 6.0, 2.0)], [1])
    np.testing.assert_allclose(line, [(2.0, 0.0, 4.0, 2.0)], atol=1e-9)  # two slices: a straight line
    with pytest.raises(ValueError):
        smooth_box_track([], [], [1])


def test_scale_box_about_its_centre_and_clipped_to_the_slice():
    from MedFMSegmentLib.prompts import scale_box

    assert scale_box((10, 20, 30, 60), 1.5, (100, 100)) == (5.0, 10.0, 35.0, 70.0)
    assert scale_box((10, 20, 30, 60), 1.0, (100, 100)) == (10.0, 20.0, 30.0, 60.0)
    # grown past the slice's edge: clipped there, not shifted
    assert scale_box((0, 0, 40, 40), 2.0, (50, 60)) == (0.0, 0.0, 59.0, 49.0)
