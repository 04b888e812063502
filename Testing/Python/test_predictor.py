"""The segmentation session: lazy cached embeddings, box and click prompts, 3D strategies, partial results."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import ellipsoid_mask
from MedFMSegmentLib.errors import CancelledError, InputError
from MedFMSegmentLib.io import MedicalImage
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.models import tiny_random_model_for_tests
from MedFMSegmentLib.geometry import box_on_axis, slice_from_volume, slice_into_volume
from MedFMSegmentLib.inference import (NOT_SEGMENTED_LOGIT, EmbeddingCache, PredictorSettings, SegmentationSession,
                                       choose_axis)
from MedFMSegmentLib.inference.consensus import rebox_logits
from MedFMSegmentLib.inference.embeddings import cuda_batch_bucket
from MedFMSegmentLib.inference.propagate import tracked_shift
from MedFMSegmentLib.prompts import Prompts, expand_box, mask_bbox


def _disk_image(rows=96, cols=128, center=(50, 60), radius=22, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    r, c = np.ogrid[:rows, :cols]
    disk = (r - center[0]) ** 2 + (c - center[1]) ** 2 <= radius ** 2
    image = 0.2 + 0.6 * disk + noise * rng.standard_normal((rows, cols))
    return MedicalImage.from_array((image * 200).astype(np.float32)), disk


def _ellipsoid_volume(seed=0):
    shape = (14, 64, 72)
    truth = ellipsoid_mask(shape, (7, 30, 38), (5.5, 16, 20))
    rng = np.random.default_rng(seed)
    volume = 100 + 500 * truth + 20 * rng.standard_normal(shape)
    return MedicalImage.from_array(volume.astype(np.float32), spacing=(1.0, 1.0, 1.0)), truth


# ----------------------------------------------------------------------------- axis choice
def _geometry(size, spacing=(1.0, 1.0, 1.0)):
    return MedicalImage.from_array(np.zeros(size[::-1], np.float32), spacing=spacing).geometry


def test_auto_axis_uses_the_slice_a_flat_box_was_drawn_on():
    geometry = _geometry((40, 50, 30))
    assert choose_axis(Prompts(box=(5, 5, 12, 30, 40, 12)), geometry) == 2
    assert choose_axis(Prompts(box=(5, 20, 3, 30, 20, 25)), geometry) == 1
    assert choose_axis(Prompts(box=(7, 5, 3, 7, 40, 25)), geometry) == 0


def test_auto_axis_slices_across_the_shortest_physical_side_of_a_3d_box():
    geometry = _geometry((40, 50, 30))
    # I is the shortest side in voxels and in mm: sagittal slices.
    assert choose_axis(Prompts(box=(10, 5, 2, 20, 45, 25)), geometry) == 0
    # With 3 mm slices the K side (8 voxels = 24 mm) is longer than the 11 mm I side ...
    assert choose_axis(Prompts(box=(10, 5, 2, 20, 45, 9)), _geometry((40, 50, 30), (1.0, 1.0, 3.0))) == 0
    # ... but with 1 mm slices K is the shortest.
    assert choose_axis(Prompts(box=(10, 5, 2, 20, 45, 9)), geometry) == 2
    # A cube keeps the usual axial slicing.
    assert choose_axis(Prompts(box=(10, 10, 10, 20, 20, 20)), geometry) == 2


def test_auto_axis_for_clicks_and_2d_images():
    geometry = _geometry((40, 50, 30))
    assert choose_axis(Prompts(positives=[(10, 12, 7)]), geometry) == 2
    assert choose_axis(Prompts(positives=[(10, 12, 7), (11, 12, 9)]), geometry) == 1
    assert choose_axis(Prompts(positives=[(10, 12, 7), (11, 14, 9)]), geometry) == 2
    assert choose_axis(Prompts(box=(5, 5, 0, 20, 20, 0)), _geometry((40, 50, 1))) == 2


def test_auto_axis_session_propagates_across_the_short_side():
    image, _ = _ellipsoid_volume()  # 72 x 64 x 14 voxels: K is the short side
    session = SegmentationSession(tiny_random_model_for_tests(), image, axis="auto",
                                  settings=PredictorSettings(box3d_strategy="propagate"))
    prompts = Prompts(box=(20, 16, 2, 56, 44, 12))
    mask = session.segment(prompts)
    assert session.axis_for(prompts) == 2 and session.auto_axis
    flat = Prompts(box=(30, 16, 2, 30, 44, 12))
    mask = session.segment(flat)
    assert session.axis_for(flat) == 0 and session.auto_axis
    assert not np.delete(mask, 30, axis=2).any()  # only the I slice the box was drawn on
    assert session.voxel_axis == 2  # segment never changes the session's own axis


# ----------------------------------------------------------------------------- plumbing (random weights)
def test_tiny_random_model_second_prompt_reuses_embedding():
    image, _ = _disk_image()
    session = SegmentationSession(tiny_random_model_for_tests(), image)
    session.predict_slice(0, box=(30, 20, 90, 80))
    assert session.cache.misses == 1 and len(session.cache) == 1
    session.predict_slice(0, box=(10, 10, 50, 50))
    session.predict_slice(0, box=(40, 30, 60, 70))
    assert len(session.cache) == 1 and session.cache.misses == 1 and session.cache.hits >= 2


def test_tiny_random_model_slices_embedded_lazily_per_axis():
    image, _ = _ellipsoid_volume()
    session = SegmentationSession(tiny_random_model_for_tests(), image, axis="axial")
    session.predict_slice(3, box=(10, 10, 40, 40))
    assert session.is_embedded(3) and not session.is_embedded(4)
    session.set_axis("coronal")
    assert session.num_slices == 64 and not session.is_embedded(3)
    mask = session.predict_slice(3, box=(10, 2, 40, 10))
    assert mask.shape == (14, 72)  # rows K, columns I


def test_tiny_random_model_batched_prefetch_gives_the_lazy_result():
    image, _ = _ellipsoid_volume()
    box = Prompts(box=(20, 16, 2, 56, 44, 12))
    lazy = SegmentationSession(tiny_random_model_for_tests(), image, axis="axial")
    assert lazy.settings.batch_size_for(lazy.model.device) == 0  # CPU: embed on demand
    expected = lazy.segment(box)
    model = tiny_random_model_for_tests()
    batch_sizes = []
    encode = model.encode
    model.encode = lambda images: batch_sizes.append(len(images)) or encode(images)
    batched = SegmentationSession(model, image, axis="axial", settings=PredictorSettings(embed_batch_size=4))
    np.testing.assert_array_equal(batched.segment(box), expected)
    assert batch_sizes == [4, 4, 3]  # the box's 11 slices, embedded ahead in batches


def test_batched_slice_transform_equals_one_slice_transform():
    """The GPU path resizes whole batches (images_to_input); it must give the one-slice inputs."""
    import torch

    from MedFMSegmentLib.preprocessing import SliceTransform

    rng = np.random.default_rng(4)
    slices = rng.random((3, 90, 70)).astype(np.float32) * np.array([1.0, 0.2, 3.0], np.float32)[:, None, None]
    for target, pixel in ((64, (1.0, 1.0)), (256, (0.5, 1.5))):
        transform = SliceTransform.create(90, 70, target, pixel)
        batched = transform.images_to_input(torch.from_numpy(slices))
        single = torch.stack([transform.image_to_input(s) for s in slices])
        assert batched.shape == (3, 3, target, target)
        torch.testing.assert_close(batched, single)
        assert batched[:, :, : transform.new_rows, : transform.new_cols].amax(dim=(1, 2, 3)).tolist() == [1.0] * 3


def test_track_shift_finds_a_known_in_plane_motion():
    """Propagation follows a structure that moves between slices (the vectorised NCC search)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    base = gaussian_filter(rng.random((80, 90)), 2).astype(np.float32)
    volume = np.stack([base, np.roll(base, (3, -4), axis=(0, 1))])  # rows +3, cols -4
    session = SegmentationSession(tiny_random_model_for_tests(), MedicalImage.from_array(volume), axis="axial")
    assert tracked_shift(session.along(2), 0, 1, (30, 25, 60, 55)) == (-4, 3)
    assert tracked_shift(session.along(2), 0, 0, (30, 25, 60, 55)) == (0, 0)
    assert tracked_shift(session.along(2), 0, 1, (0, 0, 89, 79)) == (0, 0)  # a box filling the slice cannot move


def test_embedding_cache_respects_memory_budget():
    import torch

    cache = EmbeddingCache(max_bytes=3 * 4 * 1000)
    for i in range(10):
        cache.put((2, i), torch.zeros(1000, dtype=torch.float32))
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.get((2, 9)) is not None and cache.get((2, 0)) is None


def test_sessions_share_one_embedding_budget():
    """Plumbing with a tiny random-weight model: sessions on one EmbeddingCache are bounded
    together (least recently used first, whichever session it belongs to), never see each other's
    embeddings, and clear only their own."""
    import torch

    model = tiny_random_model_for_tests()
    rng = np.random.default_rng(0)
    images = [MedicalImage.from_array(rng.random((4, 32, 32)).astype(np.float32)) for _ in range(2)]
    probe = SegmentationSession(model, images[0], axis="axial")
    one = probe.embedding(0)
    store = EmbeddingCache(max_bytes=3 * one.element_size() * one.nelement())
    a = SegmentationSession(model, images[0], axis="axial", cache=store)
    b = SegmentationSession(model, images[1], axis="axial", cache=store)
    torch.testing.assert_close(a.embedding(0), one)
    b.embedding(0), b.embedding(1)
    assert len(store) == 3 and a.cache.keys() == [(2, 0)] and b.cache.keys() == [(2, 0), (2, 1)]
    assert not torch.equal(a.embedding(0), b.embedding(0))  # same key for the session, separate entries
    b.embedding(2)  # over budget: the least recently used entry goes, here b's slice 1
    assert len(store) == 3 and store.nbytes <= store.max_bytes and b.cache.keys() == [(2, 0), (2, 2)]
    b.cache.clear()
    assert a.cache.keys() == [(2, 0)] and len(store) == 1
    assert {key[1] for key in store.keys()} == {model.cache_token}  # keyed by the model too


def test_embedding_cache_budget_defaults_per_device():
    import torch

    assert PredictorSettings().cache_bytes_for(torch.device("cpu")) == 1 << 30
    assert PredictorSettings(cache_bytes=123).cache_bytes_for(torch.device("cpu")) == 123
    session = SegmentationSession(tiny_random_model_for_tests(), MedicalImage.from_array(np.zeros((2, 8, 8))))
    assert session.cache.max_bytes == 1 << 30


def test_tiny_random_model_cancel_stops_segmentation():
    import threading

    image, _ = _ellipsoid_volume()
    session = SegmentationSession(tiny_random_model_for_tests(), image)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        session.segment(Prompts(box=(10, 10, 0, 50, 50, 13), positives=[]), propagate=False, cancel=cancel)


def test_prompt_validation_messages():
    image, _ = _ellipsoid_volume()
    session = SegmentationSession(tiny_random_model_for_tests(), image)
    with pytest.raises(InputError, match="at least one prompt"):
        session.segment(Prompts())
    with pytest.raises(InputError, match="outside"):
        session.segment(Prompts(positives=[(100, 1, 1)]))
    with pytest.raises(InputError, match="inverted"):
        session.segment(Prompts(box=(10, 10, 5, 5, 50, 6)))


# ----------------------------------------------------------------------------- real LiteMedSAM
def test_litemedsam_box_on_synthetic_disk(litemedsam):
    image, disk = _disk_image()
    c0, r0, c1, r1 = mask_bbox(disk)
    mask = SegmentationSession(litemedsam, image).segment(Prompts(box=(int(c0), int(r0), 0, int(c1), int(r1), 0)))
    assert dice(mask[0], disk) > 0.95


def test_litemedsam_decode_best_box_picks_the_box_that_fits(litemedsam):
    """Real LiteMedSAM: of a box half the disk's size and the disk's own box, its predicted IoU
    picks the disk's own box, whatever their order."""
    from MedFMSegmentLib.prompts import scale_box

    image, disk = _disk_image()
    session = SegmentationSession(litemedsam, image)
    tight = mask_bbox(disk)
    small, fitting = (expand_box(scale_box(tight, f, disk.shape), session.box_margin(), disk.shape) for f in (0.5, 1.0))
    assert dice(session.decode_slice(0, small), disk) < 0.5
    mask, picked = session.decode_best_box(0, [small, fitting])
    assert picked == 1 and dice(mask, disk) > 0.95
    mask, picked = session.decode_best_box(0, [fitting, small])
    assert picked == 0 and dice(mask, disk) > 0.95
    with pytest.raises(InputError):
        session.decode_best_box(0, [])


def test_litemedsam_single_click_becomes_box(litemedsam):
    """LiteMedSAM was trained with boxes only: one click must still find the whole disk."""
    image, disk = _disk_image()
    session = SegmentationSession(litemedsam, image)
    mask = session.segment(Prompts(positives=[(60, 50, 0)]))
    assert dice(mask[0], disk) > 0.9
    assert len(session.cache) == 1  # all the box growing reused one embedding


def test_litemedsam_negative_click_removes_component(litemedsam):
    rng = np.random.default_rng(0)
    r, c = np.ogrid[:96, :128]
    left = (r - 48) ** 2 + (c - 35) ** 2 <= 15 ** 2
    right = (r - 48) ** 2 + (c - 95) ** 2 <= 15 ** 2
    image = MedicalImage.from_array(((0.2 + 0.6 * (left | right) + 0.03 * rng.standard_normal((96, 128))) * 200)
                                    .astype(np.float32))
    session = SegmentationSession(litemedsam, image)
    both = session.segment(Prompts(box=(15, 28, 0, 115, 68, 0)))[0]
    assert dice(both, left | right) > 0.8
    only_left = session.segment(Prompts(box=(15, 28, 0, 115, 68, 0), negatives=[(95, 48, 0)]))[0]
    assert dice(only_left, left) > 0.85 and not (only_left & right).any()


@pytest.mark.parametrize("strategy", ["propagate", "auto"])  # auto: consensus for this small box
def test_litemedsam_3d_box_propagates_and_stays_in_range(litemedsam, strategy):
    image, truth = _ellipsoid_volume()
    k, j, i = np.nonzero(truth)
    box = (int(i.min()), int(j.min()), 2, int(i.max()), int(j.max()), 11)  # cuts the ellipsoid's ends
    session = SegmentationSession(litemedsam, image, settings=PredictorSettings(box3d_strategy=strategy))
    assert session.uses_consensus(box) == (strategy == "auto")
    mask = session.segment(Prompts(box=box))
    assert not mask[:2].any() and not mask[12:].any()
    assert dice(mask[2:12], truth[2:12]) > 0.85


def test_litemedsam_one_slice_prompt_propagates_through_structure(litemedsam):
    image, truth = _ellipsoid_volume()
    plane = truth[7]
    c0, r0, c1, r1 = mask_bbox(plane)
    session = SegmentationSession(litemedsam, image)
    mask = session.segment(Prompts(box=(int(c0), int(r0), 7, int(c1), int(r1), 7)), propagate=True)
    assert dice(mask, truth) > 0.85
    assert mask[2:13].any(axis=(1, 2)).all()  # reached every slice of the ellipsoid (2..12)


def test_litemedsam_real_hc18_box(litemedsam, data_dir):
    from MedFMSegmentLib.io import read_image

    folder = data_dir / "hc18_fetal_head_us"
    scores = []
    for name in ("010_HC", "020_HC"):
        image = read_image(folder / "images" / f"{name}.png")
        truth = read_image(folder / "masks" / f"{name}_mask.png").array[0] > 0
        c0, r0, c1, r1 = mask_bbox(truth)
        mask = SegmentationSession(litemedsam, image).segment(Prompts(box=(int(c0), int(r0), 0, int(c1), int(r1), 0)))
        scores.append(dice(mask[0], truth))
    assert np.mean(scores) > 0.85, scores


def test_litemedsam_real_hippocampus_slice_boxes(litemedsam, data_dir):
    """Tight per-slice boxes on real MRI; the 3D-box path is measured by bench/bench_core.py."""
    from MedFMSegmentLib.io import read_image

    folder = data_dir / "msd_hippocampus_mri"
    image = read_image(folder / "imagesTr" / "hippocampus_003.nii.gz")
    truth = read_image(folder / "labelsTr" / "hippocampus_003.nii.gz").array > 0
    session = SegmentationSession(litemedsam, image)
    scores = []
    for k in (10, 14, 17, 22, 25):
        c0, r0, c1, r1 = mask_bbox(truth[k])
        mask = session.segment(Prompts(box=(int(c0), int(r0), k, int(c1), int(r1), k)))
        assert not np.delete(mask, k, axis=0).any()  # a one-slice box touches only its slice
        scores.append(dice(mask[k], truth[k]))
    assert np.mean(scores) > 0.65, scores


# ----------------------------------------------------------------------------- 3D box strategies
def test_box3d_strategy_is_checked():
    with pytest.raises(InputError, match="3D box strategy"):
        PredictorSettings(box3d_strategy="vote")
    with pytest.raises(InputError, match="consensus rounds"):
        PredictorSettings(box3d_strategy="consensus", consensus_rounds=-1)
    with pytest.raises(InputError, match="max slices"):
        PredictorSettings(consensus_max_slices=-1)
    with pytest.raises(InputError, match="three-axis rounds"):
        PredictorSettings(box3d_strategy="consensus", consensus_three_axis_rounds=-1)


def test_auto_strategy_takes_consensus_for_small_boxes_only():
    """The default ``auto``: consensus when the box's three sides sum to at most
    ``consensus_max_slices`` voxels (then all three axes get embedded), else propagation on one axis."""
    image, _ = _ellipsoid_volume()
    box = (20, 16, 3, 56, 44, 11)  # 37 + 29 + 9 = 75 slices over its three sides
    assert PredictorSettings().box3d_strategy == "auto"
    session = SegmentationSession(tiny_random_model_for_tests(), image)
    assert session.uses_consensus(box)
    assert not SegmentationSession(tiny_random_model_for_tests(), image,
                                   settings=PredictorSettings(consensus_max_slices=74)).uses_consensus(box)
    assert SegmentationSession(tiny_random_model_for_tests(), image,
                               settings=PredictorSettings(consensus_max_slices=75)).uses_consensus(box)
    for strategy, expected in (("consensus", True), ("propagate", False)):
        assert SegmentationSession(tiny_random_model_for_tests(), image,
                                   settings=PredictorSettings(box3d_strategy=strategy)).uses_consensus(box) == expected
    session.segment(Prompts(box=box))
    assert {axis for axis, _ in session.cache.keys()} == {0, 1, 2}
    large = SegmentationSession(tiny_random_model_for_tests(), image, settings=PredictorSettings(consensus_max_slices=74))
    large.segment(Prompts(box=box))
    assert {axis for axis, _ in large.cache.keys()} == {2}


def test_decode_logits_threshold_to_decode_slice():
    image, _ = _ellipsoid_volume()
    session = SegmentationSession(tiny_random_model_for_tests(), image, axis="axial")
    box = (10.0, 8.0, 60.0, 50.0)
    logits = session.decode_logits(7, box)
    assert logits.dtype == np.float32 and logits.shape == session.slice_shape
    np.testing.assert_array_equal(logits > 0, session.decode_slice(7, box))


def test_consensus_runs_on_three_axes_and_leaves_flat_boxes_alone():
    """Plumbing with a tiny random-weight model: the consensus path embeds the box's slices along
    all three axes, segments no slice outside the box's range across its shortest side (K here),
    and a one-slice box still takes the 2D path."""
    image, _ = _ellipsoid_volume()
    settings = PredictorSettings(box3d_strategy="consensus", consensus_rounds=2)
    session = SegmentationSession(tiny_random_model_for_tests(), image, settings=settings)
    box = (20, 16, 3, 56, 44, 11)
    mask = session.segment(Prompts(box=box))
    assert mask.shape == image.array.shape
    assert {axis for axis, _ in session.cache.keys()} == {0, 1, 2}
    assert mask[3:12].any() and not mask[:3].any() and not mask[12:].any()
    flat = SegmentationSession(tiny_random_model_for_tests(), image, settings=settings)
    flat.segment(Prompts(box=(20, 16, 7, 56, 44, 7)))
    assert {axis for axis, _ in flat.cache.keys()} == {2}


def test_rebox_logits_decodes_each_masked_slice_with_its_own_box():
    """Plumbing with a tiny random-weight model: the three-axis consensus rounds decode, on every
    slice of the box's range where the mask has voxels, the mask's own box plus margin clipped to
    the 3D box, and nothing elsewhere."""
    image, _ = _ellipsoid_volume()
    session = SegmentationSession(tiny_random_model_for_tests(), image)
    box = (20, 16, 3, 56, 44, 11)
    mask = np.zeros(image.array.shape, dtype=bool)
    mask[5:8, 20:30, 30:40] = True  # (K, J, I): J slices 20-29 hold voxels
    mask[9, 35, 50] = True
    coronal = session.along(1)
    logits = rebox_logits(coronal, mask, box)
    assert session.voxel_axis == 2  # the session's own axis is left as it was
    rect, first, last = box_on_axis(box, 1)
    for j in range(first, last + 1):
        plane = slice_from_volume(logits, 1, j)
        tight = mask_bbox(slice_from_volume(mask, 1, j))
        if tight is None:
            assert (plane == NOT_SEGMENTED_LOGIT).all(), j
        else:
            expected = coronal.decode_logits(j, expand_box(tight, coronal.box_margin(), coronal.slice_shape, rect))
            np.testing.assert_array_equal(plane, expected)
    assert (logits[:, :first] == NOT_SEGMENTED_LOGIT).all() and (logits[:, last + 1:] == NOT_SEGMENTED_LOGIT).all()


def test_consensus_three_axis_rounds_raise_dice_on_a_real_hippocampus(litemedsam, data_dir):
    """Re-boxing the middle axis from the combined mask raises Dice clearly on a real MRI case
    with the real LiteMedSAM."""
    from MedFMSegmentLib.io import read_image

    folder = data_dir / "msd_hippocampus_mri"
    image = read_image(folder / "imagesTr" / "hippocampus_019.nii.gz")
    truth = read_image(folder / "labelsTr" / "hippocampus_019.nii.gz").array > 0
    k, j, i = np.nonzero(truth)
    prompts = Prompts(box=(int(i.min()), int(j.min()), int(k.min()), int(i.max()), int(j.max()), int(k.max())))
    settings = PredictorSettings(box3d_strategy="consensus", consensus_three_axis_rounds=0)
    session = SegmentationSession(litemedsam, image, settings=settings)
    without = dice(session.segment(prompts), truth)
    session.settings = dataclasses.replace(settings, consensus_three_axis_rounds=6)  # same embeddings
    with_rounds = dice(session.segment(prompts), truth)
    assert with_rounds > without + 0.03, (without, with_rounds)
    assert with_rounds > 0.75


def test_consensus_beats_propagation_on_a_real_hippocampus(litemedsam, data_dir):
    """The consensus strategy on real MRI with the real LiteMedSAM (case 001: 0.675 -> 0.776 in
    the benchmark's runs)."""
    from MedFMSegmentLib.io import read_image

    folder = data_dir / "msd_hippocampus_mri"
    image = read_image(folder / "imagesTr" / "hippocampus_001.nii.gz")
    truth = read_image(folder / "labelsTr" / "hippocampus_001.nii.gz").array > 0
    k, j, i = np.nonzero(truth)
    prompts = Prompts(box=(int(i.min()), int(j.min()), int(k.min()), int(i.max()), int(j.max()), int(k.max())))
    propagated = SegmentationSession(litemedsam, image,
                                     settings=PredictorSettings(box3d_strategy="propagate")).segment(prompts)
    consensus = SegmentationSession(litemedsam, image,
                                    settings=PredictorSettings(box3d_strategy="consensus")).segment(prompts)
    assert dice(consensus, truth) > dice(propagated, truth) + 0.05
    assert dice(consensus, truth) > 0.72


def test_cuda_batch_bucket_bounds_the_shapes():
    sizes = {cuda_batch_bucket(n, 16) for n in range(1, 17)}
    assert sizes == {1, 2, 4, 8, 16}  # five encoder shapes at most for any chunk
    assert [cuda_batch_bucket(n, 16) for n in (1, 3, 5, 9, 16)] == [1, 4, 8, 16, 16]
    assert all(n <= cuda_batch_bucket(n, 16) < 2 * n for n in range(1, 17))
    assert cuda_batch_bucket(12, 10) == 12  # a limit below the count never drops slices
    with pytest.raises(ValueError):
        cuda_batch_bucket(0, 16)


def test_mirrored_session_flips_the_columns_of_every_slice():
    """``mirrored()`` reverses each slice's columns along the current axis (I for axial and
    coronal slices, J for sagittal ones), keeps the grid, and is made once per axis."""
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = MedicalImage.from_array(array, spacing=(0.5, 0.8, 2.0))
    session = SegmentationSession(tiny_random_model_for_tests(), image, axis="axial")
    for axis in (2, 1, 0):
        session.set_axis(axis)
        mirror = session.mirrored()
        assert session.mirrored() is mirror and mirror.voxel_axis == axis
        assert mirror.image.geometry is image.geometry
        for index in range(session.num_slices):
            np.testing.assert_array_equal(slice_from_volume(mirror.image.array, axis, index),
                                          slice_from_volume(array, axis, index)[:, ::-1])
    image_2d = MedicalImage.from_array(array[0])
    np.testing.assert_array_equal(SegmentationSession(tiny_random_model_for_tests(), image_2d).mirrored().image.array,
                                  array[:1, :, ::-1])


# ----------------------------------------------------------------------------- partial results
def _replay(updates, shape):
    volume = np.zeros(shape, dtype=bool)
    for voxel_axis, index, plane in updates:
        slice_into_volume(volume, voxel_axis, index, plane)
    return volume


@pytest.mark.parametrize("strategy", ["propagate", "consensus"])
def test_litemedsam_updates_replay_to_the_3d_box_result(litemedsam, strategy):
    """``on_update`` streams the result as it grows: the prompted (middle) slice first, then its
    neighbours outwards; consensus rounds send the slices they change. Replayed in order on an
    empty volume, the updates give the returned mask."""
    image, truth = _ellipsoid_volume()
    box = (20, 16, 2, 56, 44, 12)
    session = SegmentationSession(litemedsam, image, settings=PredictorSettings(box3d_strategy=strategy))
    updates = []
    mask = session.segment(Prompts(box=box), on_update=lambda a, i, p: updates.append((a, i, p.copy())))
    axis = session.axis_for(Prompts(box=box))
    assert axis == 2 and session.voxel_axis == 2
    assert updates[0][:2] == (2, 7)  # the middle slice of k = 2..12, across the shortest side
    first_pass = [i for a, i, _ in updates if a == 2][:11]
    assert first_pass[:3] == [7, 8, 9] and len(updates) > 5
    assert all(plane.dtype == bool and plane.shape == slice_from_volume(mask, a, i).shape for a, i, plane in updates)
    np.testing.assert_array_equal(_replay(updates, mask.shape), mask)
    assert dice(mask, truth) > 0.8
    if strategy == "consensus":
        assert {a for a, _, _ in updates} == {2, 0}  # the rounds decode across the longest side (I)


def test_tiny_random_model_updates_for_clicks_and_automatic_mode():
    """Plumbing: clicked slices are sent as they are written, and automatic mode sends every
    slice in order, then what keeping the largest component changed."""
    from MedFMSegmentLib.inference import segment_automatic

    image, _ = _ellipsoid_volume()
    session = SegmentationSession(tiny_random_model_for_tests(), image, axis="axial")
    updates = []
    mask = session.segment(Prompts(positives=[(30, 30, 4), (40, 30, 9)]),
                           on_update=lambda a, i, p: updates.append((a, i, p)))
    assert [(a, i) for a, i, _ in updates] == [(2, 4), (2, 9)]
    np.testing.assert_array_equal(_replay(updates, mask.shape), mask)
    updates.clear()
    mask = segment_automatic(session, on_update=lambda a, i, p: updates.append((a, i, p)))
    assert [(a, i) for a, i, _ in updates[:14]] == [(2, i) for i in range(14)]
    np.testing.assert_array_equal(_replay(updates, mask.shape), mask)
