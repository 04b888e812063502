"""The ``sparse`` 3D box strategy: which slices it embeds, its partial results, its Dice on real MRI."""

from __future__ import annotations

import numpy as np
import pytest

from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.geometry import box_on_axis, slice_into_volume
from MedFMSegmentLib.inference import BOX3D_STRATEGIES, PredictorSettings, SegmentationSession
from MedFMSegmentLib.inference.sparse import interpolate_logits, outward_order, sparse_slices
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.models import tiny_random_model_for_tests
from MedFMSegmentLib.prompts import Prompts
from test_predictor import _ellipsoid_volume  # the synthetic volume of the session's tests


def _hippocampus(data_dir, name):
    from MedFMSegmentLib.io import read_image

    folder = data_dir / "msd_hippocampus_mri"
    image = read_image(folder / "imagesTr" / name)
    truth = read_image(folder / "labelsTr" / name).array > 0
    k, j, i = np.nonzero(truth)
    return image, truth, Prompts(box=(int(i.min()), int(j.min()), int(k.min()), int(i.max()), int(j.max()),
                                      int(k.max())))


def test_sparse_slices_start_in_the_middle_and_keep_both_ends():
    assert sparse_slices(10, 30, 4) == [20, 24, 16, 28, 12, 30, 10]
    assert sorted(sparse_slices(0, 5, 1)) == list(range(6))
    assert outward_order([3, 4, 5, 6, 7], 5) == [5, 6, 4, 7, 3]


def test_interpolate_logits_weights_by_distance():
    logits = {2: np.zeros((2, 2), np.float32), 6: np.full((2, 2), 4.0, np.float32)}
    np.testing.assert_allclose(interpolate_logits(logits, 3), 1.0)
    np.testing.assert_allclose(interpolate_logits(logits, 6), 4.0)


def test_sparse_is_a_registered_strategy_with_checked_settings():
    assert "sparse" in BOX3D_STRATEGIES
    assert PredictorSettings(box3d_strategy="sparse").strategy_for((0, 0, 0, 9, 9, 9)) == "sparse"
    assert PredictorSettings().strategy_for((0, 0, 0, 9, 9, 9)) == "consensus"
    with pytest.raises(InputError):
        PredictorSettings(box3d_strategy="sparse", sparse_stride=0)


def test_tiny_random_model_sparse_embeds_two_axes_and_a_fraction_of_the_longest():
    """Plumbing with a tiny random-weight model: slices across the shortest side (K) and only the
    chosen slices across the longest (I) are embedded, and no slice outside the box's range on
    either is segmented."""
    image, _ = _ellipsoid_volume()
    session = SegmentationSession(tiny_random_model_for_tests(), image,
                                  settings=PredictorSettings(box3d_strategy="sparse"))
    box = (20, 16, 3, 56, 44, 11)
    mask = session.segment(Prompts(box=box))
    keys = session.cache.keys()
    assert {axis for axis, _ in keys} <= {0, 2}
    _, first, last = box_on_axis(box, 0)
    assert {i for axis, i in keys if axis == 0} <= set(sparse_slices(first, last, 4))
    assert mask[3:12].any() and not mask[:3].any() and not mask[12:].any()
    assert not mask[:, :, :20].any() and not mask[:, :, 57:].any()


def test_litemedsam_sparse_partial_results_come_from_the_prompted_slice_outwards(litemedsam):
    """``on_update`` sends the middle slice across the shortest side first, then each side
    outwards; the rounds' updates follow, and replayed in order they give the returned mask."""
    image, truth = _ellipsoid_volume()
    box = (20, 16, 2, 56, 44, 12)
    session = SegmentationSession(litemedsam, image, settings=PredictorSettings(box3d_strategy="sparse"))
    updates = []
    mask = session.segment(Prompts(box=box), on_update=lambda a, i, p: updates.append((a, i, p.copy())))
    first_pass = [i for a, i, _ in updates if a == 2]
    assert first_pass[0] == 7  # the middle of k = 2..12
    up = [i for i in first_pass[1:] if i > 7]
    down = [i for i in first_pass[1:] if i < 7]
    assert up == sorted(up) and down == sorted(down, reverse=True) and up and down
    replay = np.zeros(mask.shape, dtype=bool)
    for axis, index, plane in updates:
        slice_into_volume(replay, axis, index, plane)
    np.testing.assert_array_equal(replay, mask)
    assert dice(mask, truth) > 0.8


def test_litemedsam_sparse_beats_propagation_with_far_fewer_slices_than_consensus(litemedsam, data_dir):
    """Real MRI, real LiteMedSAM (case 001 in the box3d_speed benchmark: propagation 0.666, sparse
    0.779 from 31 embedded slices, against 82 slices for consensus)."""
    image, truth, prompts = _hippocampus(data_dir, "hippocampus_001.nii.gz")
    propagated = SegmentationSession(litemedsam, image,
                                     settings=PredictorSettings(box3d_strategy="propagate")).segment(prompts)
    session = SegmentationSession(litemedsam, image, settings=PredictorSettings(box3d_strategy="sparse"))
    sparse = session.segment(prompts)
    assert dice(sparse, truth) > dice(propagated, truth) + 0.05
    assert dice(sparse, truth) > 0.75
    assert len(session.cache.keys()) < 40
