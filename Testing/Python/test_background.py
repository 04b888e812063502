"""Background embedding around the shown slice (plumbing with the tiny random-weight model, and one
check that the real LiteMedSAM's masks do not depend on which thread embedded the slice)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from MedFMSegmentLib.inference.prefetch import BackgroundEmbedder, nearest_first
from MedFMSegmentLib.io import MedicalImage
from MedFMSegmentLib.models import tiny_random_model_for_tests
from MedFMSegmentLib.inference import SegmentationSession


def _volume(seed: int = 0) -> MedicalImage:
    return MedicalImage.from_array(np.random.default_rng(seed).random((12, 40, 48)).astype(np.float32))


class CountingModel:
    """Wraps a model's ``encode`` to count the slices it embeds and optionally slow it down."""

    def __init__(self, model, delay: float = 0.0) -> None:
        self.slices = 0
        self._lock = threading.Lock()
        encode = model.encode

        def counted(images):
            with self._lock:
                self.slices += len(images)
            time.sleep(delay)
            return encode(images)

        model.encode = counted


def test_nearest_first_order_and_bounds():
    assert nearest_first(5, 2, 12) == [5, 6, 4, 7, 3]
    assert nearest_first(0, 2, 12) == [0, 1, 2]
    assert nearest_first(11, 1, 12) == [11, 10]
    assert nearest_first(3, 0, 12) == [3]


def test_focus_embeds_the_slice_and_its_neighbours_only():
    session = SegmentationSession(tiny_random_model_for_tests(), _volume(), axis="axial")
    embedder = BackgroundEmbedder(session, radius=2)
    try:
        embedder.focus(2, 5)
        assert embedder.wait_idle(timeout=60)
        assert sorted(session.cache.keys()) == [(2, i) for i in (3, 4, 5, 6, 7)]
        assert embedder.embedded == 5 and embedder.last_error is None
        # Another axis, at the volume's edge: clipped to the volume, nothing else touched.
        embedder.focus(0, 0)
        assert embedder.wait_idle(timeout=60)
        assert {k for k in session.cache.keys() if k[0] == 0} == {(0, 0), (0, 1), (0, 2)}
        assert session.voxel_axis == 2  # the session's own axis is never changed by the worker
    finally:
        embedder.stop()
    assert not embedder.running


def test_background_embeddings_equal_foreground_ones():
    image = _volume(1)
    model = tiny_random_model_for_tests()
    background = SegmentationSession(model, image, axis="axial")
    embedder = BackgroundEmbedder(background, radius=0)
    embedder.focus(2, 7)
    assert embedder.wait_idle(timeout=60)
    embedder.stop()
    foreground = SegmentationSession(model, image, axis="axial")
    torch.testing.assert_close(background.embedding(7), foreground.embedding(7), rtol=0, atol=0)
    box = (5, 6, 30, 28)
    np.testing.assert_array_equal(background.predict_slice(7, box), foreground.predict_slice(7, box))


def test_a_prompt_on_a_slice_in_flight_waits_instead_of_encoding_again():
    model = tiny_random_model_for_tests()
    counter = CountingModel(model, delay=0.5)
    session = SegmentationSession(model, _volume(2), axis="axial")
    embedder = BackgroundEmbedder(session, radius=0)
    try:
        embedder.focus(2, 4)
        deadline = time.monotonic() + 10
        while counter.slices == 0 and time.monotonic() < deadline:  # the worker has started encoding
            time.sleep(0.01)
        session.predict_slice(4, (5, 6, 30, 28))  # the "user" prompts on the same slice meanwhile
        assert embedder.wait_idle(timeout=60)
        assert counter.slices == 1
    finally:
        embedder.stop()


def test_moving_the_focus_drops_the_old_plan():
    model = tiny_random_model_for_tests()
    CountingModel(model, delay=0.2)
    session = SegmentationSession(model, _volume(3), axis="axial")
    embedder = BackgroundEmbedder(session, radius=3)
    try:
        embedder.focus(2, 2)
        time.sleep(0.05)
        embedder.focus(2, 10)
        assert embedder.wait_idle(timeout=60)
        keys = {i for _, i in session.cache.keys()}
        assert {7, 8, 9, 10, 11} <= keys
        assert len(keys & {0, 1, 3, 4, 5}) <= 1  # at most the slice already in progress when focus moved
    finally:
        embedder.stop()


def test_failures_are_recorded_not_raised():
    session = SegmentationSession(tiny_random_model_for_tests(), _volume(), axis="axial")
    embedder = BackgroundEmbedder(session, radius=0)

    def broken(voxel_axis, index):
        raise RuntimeError("simulated encoder failure")

    session.embedding_along = broken
    embedder.focus(2, 3)
    assert embedder.wait_idle(timeout=30)
    assert isinstance(embedder.last_error, RuntimeError) and embedder.running
    embedder.stop()
    with pytest.raises(ValueError):
        BackgroundEmbedder(session, radius=-1)


def test_real_litemedsam_mask_is_the_same_after_background_embedding(litemedsam, data_dir):
    """The shown slice embedded in the background gives the same HC18 mask as a foreground prompt."""
    from MedFMSegmentLib.io import read_image
    from MedFMSegmentLib.prompts import mask_bbox

    hc18 = data_dir / "hc18_fetal_head_us"
    image = read_image(hc18 / "images" / "010_HC.png")
    truth = read_image(hc18 / "masks" / "010_HC_mask.png").array[0] > 0
    box = mask_bbox(truth)
    session = SegmentationSession(litemedsam, image)
    embedder = BackgroundEmbedder(session, radius=0)
    embedder.focus(2, 0)
    assert embedder.wait_idle(timeout=120)
    embedder.stop()
    misses = session.cache.misses
    mask = session.predict_slice(0, box)
    assert session.cache.misses == misses  # the prompt found the embedding ready
    np.testing.assert_array_equal(mask, SegmentationSession(litemedsam, image).predict_slice(0, box))
