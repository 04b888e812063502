"""The propagation decoder step: device-side mask statistics and the same masks as the session."""

from __future__ import annotations

import numpy as np
import torch

from MedFMSegmentLib.decoder_step import DecoderStep, mask_statistics, to_stats
from MedFMSegmentLib.io import MedicalImage
from MedFMSegmentLib.models import tiny_random_model_for_tests
from MedFMSegmentLib.inference import SegmentationSession
from MedFMSegmentLib.prompts import mask_bbox


def test_mask_statistics_match_numpy():
    rng = np.random.default_rng(3)
    for density in (0.0, 0.001, 0.05, 0.5):
        mask = rng.random((37, 53)) < density
        previous = rng.random((37, 53)) < 0.3
        stats = to_stats(mask_statistics(torch.from_numpy(mask), torch.from_numpy(previous)))
        assert stats.area == int(mask.sum())
        assert stats.overlap == int((mask & previous).sum())
        assert stats.box == mask_bbox(mask)


def test_step_gives_the_sessions_mask_and_keeps_it_on_the_device():
    rng = np.random.default_rng(0)
    volume = (100 + 50 * rng.standard_normal((3, 48, 56))).astype(np.float32)
    session = SegmentationSession(tiny_random_model_for_tests(), MedicalImage.from_array(volume), axis="axial")
    step = DecoderStep(session.model, session.transform)
    assert not step.use_graph  # CPU: eager
    box = (5.0, 8.0, 40.0, 30.0)
    mask, stats = step(session.embedding(1), box)
    expected = session.decode_slice(1, box)
    assert isinstance(mask, torch.Tensor) and mask.shape == expected.shape
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert stats.area == int(expected.sum()) and stats.box == mask_bbox(expected)
    assert stats.overlap == 0  # no previous mask yet
    step.set_previous(mask)
    _, again = step(session.embedding(1), box)
    assert again.overlap == again.area


def test_step_made_in_inference_mode_is_usable_outside_it():
    """A session's step may first be built under ``torch.inference_mode`` (an interactive
    prompt) and then drive propagation outside it (seen on CUDA, where prompts use the step)."""
    rng = np.random.default_rng(1)
    volume = (100 + 50 * rng.standard_normal((3, 40, 40))).astype(np.float32)
    session = SegmentationSession(tiny_random_model_for_tests(), MedicalImage.from_array(volume), axis="axial")
    with torch.inference_mode():
        step = session.decoder_step()
        step(session.embedding(0), (2.0, 2.0, 30.0, 30.0))
    mask, stats = step(session.embedding(1), (2.0, 2.0, 30.0, 30.0))
    step.set_previous(torch.ones(40, 40, dtype=torch.bool))
    _, again = step(session.embedding(1), (2.0, 2.0, 30.0, 30.0))
    assert again.overlap == stats.area
