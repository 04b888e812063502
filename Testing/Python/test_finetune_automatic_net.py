"""Automatic mode's engine for volumes: the adapter or its U-Net, chosen on held-out volumes.

Real LiteMedSAM and real hippocampus MRI, with a few training steps and a few seconds of U-Net
training (plumbing budgets: which engine wins here says nothing about a real budget, so the tests
check that the recorded figures are what each engine really scores and that the rule follows them).
"""
import numpy as np
import pytest
import torch

from conftest import DATA_DIR
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.finetune.adapters import load_adapted_model, save_adapter
from MedFMSegmentLib.finetune.automatic_choice import NET_PREFIX, held_out_cases
from MedFMSegmentLib.finetune.baseline import MAX_PATCH_VOXELS, SegmentationNet, _patch_for, train_baseline
from MedFMSegmentLib.finetune.continual import continue_adapter
from MedFMSegmentLib.finetune.trainer import FinetuneConfig, check_config, finetune
from MedFMSegmentLib.inference import SegmentationSession
from MedFMSegmentLib.inference.automatic import keep_largest_component, segment_automatic
from MedFMSegmentLib.io import MedicalImage, read_image, read_label
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.prompts import Prompts

DATA = DATA_DIR / "msd_hippocampus_mri"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared hippocampus data absent")
QUICK = dict(device="cpu", encoder="frozen", steps=20, embedding_budget=16, validate_every=10,
             automatic_net_seconds=4)


def _case(n: int):
    return (read_image(DATA / "imagesTr" / f"hippocampus_{n:03d}.nii.gz"),
            read_label(DATA / "labelsTr" / f"hippocampus_{n:03d}.nii.gz"))


@pytest.fixture(scope="module")
def trained(litemedsam):
    cases = [_case(n) for n in (1, 3, 4)]
    reports = []
    model, metadata = finetune(cases, FinetuneConfig(**QUICK), progress=reports.append)
    return cases, model, metadata, reports


def test_held_out_volumes_are_chosen_apart_from_everything_else():
    image = MedicalImage.from_array(np.zeros((4, 5, 6), np.float32))
    flat = MedicalImage.from_array(np.zeros((1, 5, 6), np.float32))
    config = FinetuneConfig()
    assert held_out_cases([(image, image)] * 2, config) == []  # two volumes: none to spare
    assert len(held_out_cases([(image, image)] * 5, config)) == 1
    assert len(held_out_cases([(image, image)] * 10, config)) == 2
    assert held_out_cases([(flat, flat)] * 10, config) == []  # 2D images: the slice split holds them out
    assert held_out_cases([(image, image)] * 5, config) == held_out_cases([(image, image)] * 5, config)
    assert held_out_cases([(image, image)] * 5, FinetuneConfig(automatic_net="off")) == []
    assert held_out_cases([(image, image)] * 5, FinetuneConfig(automatic_fraction=0.0)) == []


def test_a_continued_adapter_never_holds_out_a_new_correction():
    from MedFMSegmentLib.finetune.lineage import ParentAdapter

    image = MedicalImage.from_array(np.zeros((4, 5, 6), np.float32))
    parent = ParentAdapter("parent", {}, {}, "0" * 64, replayed_cases=4)
    for seed in range(20):
        held = held_out_cases([(image, image)] * 6, FinetuneConfig(seed=seed), parent)
        assert len(held) == 1 and held[0] < 4  # one of the 4 replayed cases, never case 4 or 5
    parent.replayed_cases = 0  # the service replays nothing: every case may be a correction
    assert held_out_cases([(image, image)] * 6, FinetuneConfig(), parent) == []


@needs_data
def test_the_engine_is_chosen_on_the_held_out_volume_it_never_trained_on(trained):
    cases, model, metadata, reports = trained
    engine = metadata["automatic_engine"]
    held = [n for n, (_, label) in enumerate(cases) if label.source in engine["held_out"]]
    # held-out volumes train nothing: more of their slices validate than a slice split would take
    assert len(held) == 1 and metadata["validation_slices"] > FinetuneConfig().max_validation_slices
    # validation slices all come from the held-out volume
    assert {case for case, _, _ in metadata["validation_comparison"]["slices"]} == set(held)
    image, label = cases[held[0]]
    truth = label.array != 0
    net, model.automatic_net = model.automatic_net, None
    try:
        adapter = dice(segment_automatic(SegmentationSession(model, image, axis="axial")), truth)
    finally:
        model.automatic_net = net
    assert engine["adapter_dice"] == pytest.approx(adapter, abs=1e-4)
    assert engine["chosen"] == ("unet" if engine["unet_dice"] > engine["adapter_dice"] else "adapter")
    assert (model.automatic_net is not None) == (engine["chosen"] == "unet")
    if model.automatic_net is not None:
        mask = keep_largest_component(model.automatic_net.segment(image, FinetuneConfig().intensity))
        assert engine["unet_dice"] == pytest.approx(dice(mask, truth), abs=1e-4)
        assert metadata["automatic_net"] == model.automatic_net.settings() and metadata["format"] == 2
    else:
        assert metadata["format"] == 1
    seconds = [r for r in reports if r.get("stage") == "automatic_net"]
    assert seconds[0]["total"] == 4 and seconds[-1]["done"] == 4


@needs_data
def test_a_kept_unet_reloads_segments_automatically_and_leaves_prompts_to_litemedsam(trained, tmp_path, litemedsam):
    cases, model, metadata, _ = trained
    if model.automatic_net is None:  # make the U-Net's path the one under test (its figures were checked above)
        pytest.skip("this run kept the adapter's decoder")
    save_adapter(model, tmp_path / "adapter", metadata)
    reloaded, info = load_adapted_model(tmp_path / "adapter", device="cpu")
    assert isinstance(reloaded.automatic_net, SegmentationNet)
    image, label = cases[0]
    updates = []
    mine = segment_automatic(SegmentationSession(model, image, axis="axial"))
    theirs = segment_automatic(SegmentationSession(reloaded, image, axis="axial"),
                               on_update=lambda *u: updates.append(u))
    np.testing.assert_array_equal(mine, theirs)
    expected = keep_largest_component(reloaded.automatic_net.segment(image, info.intensity))
    np.testing.assert_array_equal(theirs, expected)
    assert len(updates) == image.array.shape[0] and theirs.any()  # every axial slice reported
    # a box prompt is LiteMedSAM's: the same with the U-Net removed
    k = int(np.flatnonzero((label.array != 0).any(axis=(1, 2)))[0]) + 2
    rows, cols = np.nonzero(label.array[k])
    prompts = Prompts(box=(int(cols.min()), int(rows.min()), k, int(cols.max()), int(rows.max()), k))
    with_net = SegmentationSession(reloaded, image, axis="axial").segment(prompts)
    net, reloaded.automatic_net = reloaded.automatic_net, None
    np.testing.assert_array_equal(with_net, SegmentationSession(reloaded, image, axis="axial").segment(prompts))
    # a single 2D slice is not for the 3D U-Net: the adapter's own slice path segments it
    flat = MedicalImage.from_array(image.array[k:k + 1])
    without = segment_automatic(SegmentationSession(reloaded, flat, axis="axial"))
    reloaded.automatic_net = net
    np.testing.assert_array_equal(segment_automatic(SegmentationSession(reloaded, flat, axis="axial")), without)


@needs_data
def test_a_continued_adapter_trains_its_parents_unet_on(trained, tmp_path, litemedsam):
    cases, model, metadata, _ = trained
    if model.automatic_net is None:
        pytest.skip("this run kept the adapter's decoder")
    save_adapter(model, tmp_path / "parent", metadata)
    child, child_meta = continue_adapter(tmp_path / "parent", [_case(6)], tmp_path / "child", replay=False,
                                         device="cpu", steps=5, embedding_budget=8,
                                         automatic_net_seconds=2)
    engine = child_meta["automatic_engine"]
    assert engine["chosen"] == "unet" and "parent" in engine["why"] and engine["unet_steps"] >= 1
    assert "held_out" not in engine  # one new case: nothing of the parent's to hold out
    parent_weights = {k: v for k, v in model.automatic_net.state_dict().items()}
    changed = [k for k, v in child.automatic_net.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, parent_weights[k])]
    assert changed  # trained further, from the parent's weights (same keys and shapes)
    reloaded, _ = load_adapted_model(tmp_path / "child", device="cpu")
    assert all(torch.equal(v, child.automatic_net.state_dict()[k]) for k, v in reloaded.automatic_net.state_dict().items())


@needs_data
def test_two_volumes_or_off_keep_the_adapter_and_say_why(litemedsam):
    cases = [_case(n) for n in (1, 3)]
    _, metadata = finetune(cases, FinetuneConfig(**{**QUICK, "steps": 2, "embedding_budget": 4}))
    assert metadata["automatic_net"] is None and "fewer than 3 volumes" in metadata["automatic_engine"]["why"]
    _, metadata = finetune(cases + [_case(4)], FinetuneConfig(**{**QUICK, "steps": 2, "embedding_budget": 4,
                                                                 "automatic_net": "off"}))
    assert metadata["automatic_net"] is None and metadata["automatic_engine"]["why"] == "not asked for"


def test_bad_automatic_net_settings_are_refused():
    with pytest.raises(InputError, match="auto or off"):
        check_config(FinetuneConfig(automatic_net="always"))
    for seconds in (0, "ten", True):
        with pytest.raises(InputError, match="training time"):
            check_config(FinetuneConfig(automatic_net_seconds=seconds))


def test_large_volumes_train_on_patches_and_predict_by_sliding_window():
    """A CT-sized volume cannot train whole: random patches around the structure, then a
    sliding-window prediction on the full grid."""
    assert _patch_for((32, 48, 40), 8) is None
    patch = _patch_for((48, 512, 512), 8)
    assert np.prod(patch) <= MAX_PATCH_VOXELS and patch[0] == 48 and all(p % 8 == 0 for p in patch)
    rng = np.random.default_rng(0)
    shape = (40, 200, 180)
    array = rng.normal(0, 1, shape).astype(np.float32)
    truth = np.zeros(shape, bool)
    truth[10:30, 80:120, 60:100] = True
    array[truth] += 4
    image = MedicalImage.from_array(array)
    label = MedicalImage.from_array(truth.astype(np.uint8))
    from MedFMSegmentLib.finetune.baseline import BaselineConfig

    model = train_baseline([(image, label)], BaselineConfig(seconds=1, max_steps=2, channels=(4, 8)))
    assert model.net.patch is not None and np.prod(model.net.patch) <= MAX_PATCH_VOXELS
    assert model.net.segment(image, FinetuneConfig().intensity).shape == shape
    whole = SegmentationNet(3, (4, 8))  # trained on small volumes: a large one goes by sliding window too
    assert whole.patch is None and whole.segment(image, FinetuneConfig().intensity).shape == shape
