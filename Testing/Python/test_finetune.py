"""Fine-tuning: plumbing with the tiny random model, save/reload identity with the real LiteMedSAM."""
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_DIR
from MedFMSegmentLib.errors import CancelledError, InputError
from MedFMSegmentLib.finetune.adapters import EmbeddingAdapter, load_adapted_model, save_adapter
from MedFMSegmentLib.inference.automatic import segment_automatic
from MedFMSegmentLib.finetune.trainer import FinetuneConfig, finetune
from MedFMSegmentLib.io import MedicalImage, read_image, read_label
from MedFMSegmentLib import loading, models
from MedFMSegmentLib.models import tiny_random_model_for_tests
from MedFMSegmentLib.inference import SegmentationSession
from MedFMSegmentLib.metrics import dice

DATA = DATA_DIR / "msd_hippocampus_mri"
TINY = "tiny_random_for_tests"


@pytest.fixture(autouse=True)
def tiny_model_by_name(monkeypatch):
    """Plumbing: ``--model tiny_random_for_tests`` (or model_name=TINY) loads the tiny random model.

    Production code knows no test model; the test replaces the model loader instead.
    """
    real = loading.load_model

    def load(name=models.DEFAULT_MODEL, *args, **kwargs):
        return tiny_random_model_for_tests() if name == TINY else real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", load)


def _synthetic_case(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((6, 40, 40)).astype(np.float32) * 50
    label = np.zeros((6, 40, 40), np.uint8)
    label[1:5, 10:25, 12:30] = 1
    image[label > 0] += 150
    return MedicalImage.from_array(image), MedicalImage.from_array(label)


def test_tiny_finetune_save_reload_identical(tmp_path):
    cases = [_synthetic_case(0), _synthetic_case(1)]
    reports = []
    model, metadata = finetune(cases, FinetuneConfig(model_name=TINY, steps=4, validate_every=2, device="cpu",
                                                     encoder="lora"),
                               progress=reports.append)
    assert [r["step"] for r in reports] == [1, 2, 3, 4]
    assert all({"step", "steps", "loss", "val_dice"} <= set(r) for r in reports)
    assert metadata["encoder"] == "lora" and metadata["lora"]["layers"] > 0
    assert metadata["embedding_adapter"] is None and model.embedding_adapter is None  # LoRA adapts the encoder
    previous_umask = os.umask(0o022)
    try:
        folder = save_adapter(model, tmp_path / "adapter", metadata)
    finally:
        os.umask(previous_umask)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "metadata.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # A portable adapter: as readable as any folder the user makes (mkdtemp would give 0700).
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}
    reloaded, info = load_adapted_model(folder, model_name=TINY)
    assert info.automatic and info.keep_components == "largest"
    session_a = SegmentationSession(model, cases[0][0])
    session_b = SegmentationSession(reloaded, cases[0][0])
    np.testing.assert_array_equal(segment_automatic(session_a), segment_automatic(session_b))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode(x), reloaded.encode(x))


def test_tiny_frozen_encoder_trains_decoder_only_on_cached_embeddings(tmp_path):
    cases = [_synthetic_case(0), _synthetic_case(1)]
    reports = []
    config = FinetuneConfig(model_name=TINY, steps=6, validate_every=3, device="cpu", embedding_budget=10)
    base = tiny_random_model_for_tests()
    model, metadata = finetune(cases, config, progress=reports.append)
    embedding_reports = [r for r in reports if r.get("stage") == "embedding"]
    # validation slices + at most the budget; each slice embedded once, before the first step
    assert embedding_reports and embedding_reports[-1]["done"] == embedding_reports[-1]["total"] <= 10 + 8
    assert [r["step"] for r in reports if "step" in r] == list(range(1, 7))
    assert metadata["encoder"] == "frozen" and metadata["lora"] is None
    assert metadata["embedding_adapter"] == {"channels": 64, "prompt_free_only": True}  # the default scope
    assert model.embedding_adapter.up.weight.abs().max() > 0  # trained away from its zero start
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode(x), base.encode(x))  # the encoder did not change
    assert any(not torch.equal(a, b) for (_, a), (_, b) in
               zip(model.mask_decoder.state_dict().items(), base.mask_decoder.state_dict().items()))
    folder = save_adapter(model, tmp_path / "adapter", metadata)
    reloaded, info = load_adapted_model(folder, model_name=TINY)
    assert reloaded.embedding_adapter is not None
    with torch.no_grad():
        e = model.encode(x)
        assert torch.equal(model.decode(e)[0], reloaded.decode(e)[0])
    # Metadata that does not describe the weights (here: no embedding adapter) is refused, not
    # loaded with the adapter's weights silently dropped.
    import json

    meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    meta["embedding_adapter"] = None
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not match its metadata"):
        load_adapted_model(folder, model_name=TINY)


def test_tiny_partial_encoder_trains_lora_in_the_last_stage_on_cached_inputs(tmp_path):
    """"partial": LoRA in the chosen stage only, the stages before it run once per planned slice;
    the adapter reloads to the trained outputs, through the whole encoder."""
    cases = [_synthetic_case(0), _synthetic_case(1)]
    reports = []
    config = FinetuneConfig(model_name=TINY, steps=6, validate_every=3, device="cpu", encoder="partial",
                            encoder_stages=(0,), embedding_budget=10)
    base = tiny_random_model_for_tests()
    model, metadata = finetune(cases, config, progress=reports.append)
    embedding_reports = [r for r in reports if r.get("stage") == "embedding"]
    assert embedding_reports and embedding_reports[-1]["done"] == embedding_reports[-1]["total"] <= 10 + 8
    assert [r["step"] for r in reports if "step" in r] == list(range(1, 7))
    assert metadata["encoder"] == "partial"
    assert metadata["lora"]["encoder_stages"] == [0] and metadata["lora"]["layers"] == 2
    assert metadata["embedding_adapter"] == {"channels": 64, "prompt_free_only": True}
    lora_b = [p for n, p in model.image_encoder.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # trained away from their zero start
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(model.encode(x), base.encode(x))
    reloaded, _ = load_adapted_model(save_adapter(model, tmp_path / "adapter", metadata), model_name=TINY)
    with torch.no_grad():
        assert torch.equal(model.encode(x), reloaded.encode(x))
    np.testing.assert_array_equal(segment_automatic(SegmentationSession(model, cases[0][0])),
                                  segment_automatic(SegmentationSession(reloaded, cases[0][0])))


def test_partial_encoder_stage_out_of_range_is_one_clear_error():
    with pytest.raises(InputError, match="first trained encoder stage"):
        finetune([_synthetic_case(0)], FinetuneConfig(model_name=TINY, steps=1, device="cpu", encoder="partial",
                                                      encoder_stages=(3,)))


def test_finetune_cli_offers_the_trainer_encoder_modes():
    import argparse

    from MedFMSegmentLib.cli import finetune as finetune_command
    from MedFMSegmentLib.finetune.trainer import ENCODER_MODES

    parser = argparse.ArgumentParser()
    finetune_command.add_arguments(parser)
    action = next(a for a in parser._actions if "--encoder" in a.option_strings)
    assert tuple(action.choices) == ENCODER_MODES and action.default == "auto"


def test_saved_state_comes_from_the_second_half_of_training():
    """Validation checks in the first half neither become the saved state nor stop training
    (a 2-image validation set once rated step 100 of 800 best); the metadata names the step kept."""
    cases = [_synthetic_case(0), _synthetic_case(1)]
    reports = []
    config = FinetuneConfig(model_name=TINY, steps=12, validate_every=2, early_stopping_patience=1, device="cpu",
                            embedding_budget=10)
    _, metadata = finetune(cases, config, progress=reports.append)
    checks = {r["step"]: r["val_dice"] for r in reports if r.get("val_dice") is not None}
    assert min(checks) == 2 and metadata["steps"] >= 6 + 2  # one bad check after the first eligible one at the least
    eligible = {step: dice for step, dice in checks.items() if step >= 6}
    assert metadata["best_step"] == max(eligible, key=lambda step: (eligible[step], -step))
    assert metadata["validation_dice"] == eligible[metadata["best_step"]]


def test_embedding_adapter_starts_as_the_identity():
    """Its last layer starts at zero: before training, the adapted decoder gives the base output
    bit for bit, so training starts from the base model."""
    torch.manual_seed(0)
    adapter = EmbeddingAdapter(embedding_channels=32, channels=8)
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        assert torch.equal(adapter(x), x)
        torch.nn.init.normal_(adapter.up.weight)
        assert not torch.equal(adapter(x), x)  # and it is in the path once it has weights


def test_prompt_free_only_embedding_adapter_leaves_prompted_decoding_alone(tmp_path):
    """An adapter trained for automatic mode only changes prompt-free decoding; box prompts see
    the raw embedding. The setting survives saving and reloading."""
    cases = [_synthetic_case(0), _synthetic_case(1)]
    config = FinetuneConfig(model_name=TINY, steps=4, validate_every=2, device="cpu", embedding_budget=10,
                            embedding_adapter_scope="automatic")
    model, metadata = finetune(cases, config)
    assert metadata["embedding_adapter"] == {"channels": 64, "prompt_free_only": True}
    torch.nn.init.normal_(model.embedding_adapter.up.weight)  # make sure it is not the identity
    reloaded, _ = load_adapted_model(save_adapter(model, tmp_path / "adapter", metadata), model_name=TINY)
    embedding = torch.randn(1, 32, 4, 4)  # the tiny model's embedding: 32 channels, 4 x 4
    box = torch.tensor([[4.0, 4.0, 40.0, 40.0]])
    with torch.no_grad():
        for adapted in (model, reloaded):
            adapter, adapted.embedding_adapter = adapted.embedding_adapter, None
            raw_box, raw_free = adapted.decode(embedding, boxes=box)[0], adapted.decode(embedding)[0]
            adapted.embedding_adapter = adapter
            assert torch.equal(adapted.decode(embedding, boxes=box)[0], raw_box)
            assert not torch.equal(adapted.decode(embedding)[0], raw_free)


def test_cancel_writes_nothing(tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        finetune([_synthetic_case()], FinetuneConfig(model_name=TINY, steps=3, device="cpu"), cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs():
    image, label = _synthetic_case()
    with pytest.raises(InputError, match="no foreground"):
        finetune([(image, MedicalImage.from_array(np.zeros_like(label.array)))], FinetuneConfig(model_name=TINY))
    with pytest.raises(InputError, match="label value 5"):
        finetune([(image, label)], FinetuneConfig(model_name=TINY, label_value=5))
    with pytest.raises(InputError, match="grids differ"):
        finetune([(image, MedicalImage.from_array(label.array[:, :30]))], FinetuneConfig(model_name=TINY))
    with pytest.raises(InputError, match="embedding adapter channels"):
        finetune([(image, label)], FinetuneConfig(model_name=TINY, embedding_adapter_channels=-1))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "finetune", *args],
                          capture_output=True, text=True)


@pytest.mark.skipif(not DATA.is_dir(), reason="shared hippocampus data absent")
def test_cli_bad_inputs(tmp_path):
    img = str(DATA / "imagesTr" / "hippocampus_001.nii.gz")
    lbl = str(DATA / "labelsTr" / "hippocampus_001.nii.gz")
    other = str(DATA / "labelsTr" / "hippocampus_003.nii.gz")
    out = tmp_path / "adapter"
    for args in ([ "--image", img, "-o", str(out)], ["--image", img, "--label", other, "-o", str(out)],
                 ["--image", img, "--label", lbl, "--label-value", "9", "-o", str(out)]):
        result = _cli(*args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not out.exists()


@pytest.mark.skipif(not DATA.is_dir(), reason="shared hippocampus data absent")
def test_real_litemedsam_adapter_roundtrip(tmp_path):
    cases = [(read_image(DATA / "imagesTr" / f"hippocampus_{n:03d}.nii.gz"),
              read_label(DATA / "labelsTr" / f"hippocampus_{n:03d}.nii.gz")) for n in (1, 3)]
    config = FinetuneConfig(steps=2, validate_every=2, max_validation_slices=1, device="cpu", encoder="lora")
    model, metadata = finetune(cases, config)
    folder = save_adapter(model, tmp_path / "adapter", metadata)
    assert (folder / "adapter.safetensors").stat().st_size < 20 * 2**20
    for key in ("base_model", "label_name", "label_value", "intensity", "training_cases", "steps",
                "validation_dice", "library_version", "date", "lora", "automatic"):
        assert key in metadata
    assert metadata["training_cases"]["count"] == 2
    reloaded, info = load_adapted_model(folder, device="cpu")
    assert reloaded.backend == "torch"  # a LoRA encoder would need its own conversion: PyTorch
    # identical outputs: BatchNorm must have stayed frozen during training
    session = SegmentationSession(model, cases[0][0])
    x = session.transform.image_to_input(session.slice_image(session.num_slices // 2))[None]
    with torch.no_grad():
        e1, e2 = model.encode(x), reloaded.encode(x)
        assert torch.equal(e1, e2)
        assert torch.equal(model.decode(e1)[0], reloaded.decode(e2)[0])
    # wrong base model: tampered SHA-256
    import json

    meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    meta["base_model"]["sha256"] = "0" * 64
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="SHA-256"):
        load_adapted_model(folder, device="cpu")


@pytest.mark.skipif(not DATA.is_dir(), reason="shared hippocampus data absent")
def test_real_frozen_encoder_adapter_runs_on_the_base_accelerated_encoder(tmp_path, litemedsam):
    """A frozen-encoder adapter reloads with the encoder on the base model's converted graph (the
    one its training embeddings came from) and its own decoder in PyTorch."""
    cases = [(read_image(DATA / "imagesTr" / f"hippocampus_{n:03d}.nii.gz"),
              read_label(DATA / "labelsTr" / f"hippocampus_{n:03d}.nii.gz")) for n in (1, 3)]
    config = FinetuneConfig(steps=2, validate_every=2, max_validation_slices=1, device="cpu", encoder="frozen",
                            embedding_budget=6)
    model, metadata = finetune(cases, config)
    folder = save_adapter(model, tmp_path / "adapter", metadata)
    reloaded, _ = load_adapted_model(folder, device="cpu")
    if litemedsam.backend != "openvino":
        pytest.skip("OpenVINO is not in use on this machine")
    assert reloaded.backend == "openvino" and reloaded.accelerator.precision == litemedsam.accelerator.precision
    session = SegmentationSession(reloaded, cases[0][0])
    x = session.transform.image_to_input(session.slice_image(session.num_slices // 2))[None]
    box = torch.tensor([[60.0, 70.0, 180.0, 200.0]])
    with torch.no_grad():
        embedding = reloaded.encode(x)
        assert torch.equal(embedding, litemedsam.encode(x))  # the same converted encoder graph
        # The adapter's decoder runs in PyTorch, as trained: exactly the trained model's output.
        assert torch.equal(reloaded.decode(embedding, boxes=box)[0], model.decode(embedding, boxes=box)[0])
        assert not torch.equal(reloaded.decode(embedding, boxes=box)[0], litemedsam.decode(embedding, boxes=box)[0])


def test_frozen_encoder_fills_its_embedding_budget_with_augmented_copies():
    """Few slices (2D cases): originals, flipped copies, then augmented copies up to the budget.
    Many slices: originals and flips only, so 3D training sees what it saw before."""
    from MedFMSegmentLib.finetune.trainer import _embed, _plan_embeddings, _Slice

    mask = np.zeros((32, 32), bool)
    mask[8:20, 10:26] = True
    few = [_Slice(np.random.default_rng(n).random((32, 32)).astype(np.float32), mask, (1.0, 1.0), n)
           for n in range(3)]
    plan = _plan_embeddings(few, [], 20, 0.8, True, np.random.default_rng(0))
    assert len(plan) == 20
    assert [(flip, seed) for _, flip, seed in plan[:6]] == [(False, None)] * 3 + [(True, None)] * 3
    seeds = [seed for _, _, seed in plan[6:]]
    assert None not in seeds and len(set(seeds)) == len(seeds)
    assert {id(item) for item, _, _ in plan[6:]} == {id(item) for item in few}  # every original is used
    assert len(_plan_embeddings(few, [], 20, 0.8, False, np.random.default_rng(0))) == 3  # no augmentation
    many = [_Slice(np.zeros((32, 32), np.float32), mask, (1.0, 1.0), n) for n in range(30)]
    plan = _plan_embeddings(many, [], 40, 0.8, True, np.random.default_rng(0))
    assert len(plan) == 40 and all(seed is None for _, _, seed in plan)

    model = tiny_random_model_for_tests()
    plain = _embed(model, few[0], False)
    first, again = (_embed(model, few[0], False, seeds[0]) for _ in range(2))
    assert not torch.equal(plain.embedding, first.embedding)
    assert torch.equal(first.embedding, again.embedding) and torch.equal(first.target, again.target)


def test_augmented_copy_moves_image_and_mask_together():
    from MedFMSegmentLib.finetune.trainer import _augment

    mask = np.zeros((48, 64), bool)
    mask[10:30, 20:50] = True
    for seed in range(8):
        image, moved = _augment(mask.astype(np.float32), mask, np.random.default_rng(seed))
        assert dice(image > 0.5, moved) > 0.95


def test_automatic_box_threshold_places_the_first_box():
    """Plumbing (tiny random model): the prompt-free logits are what ``decode_slice`` thresholds,
    and ``box_threshold`` decides which of them place the first box."""
    from MedFMSegmentLib.geometry import slice_from_volume
    from MedFMSegmentLib.prompts import expand_box

    session = SegmentationSession(tiny_random_model_for_tests(), _synthetic_case(0)[0])
    for index in range(session.num_slices):
        np.testing.assert_array_equal(session.prompt_free_logits(index) > 0, session.decode_slice(index))
    unrefined = segment_automatic(session, refine_iterations=0, keep="all")
    # A threshold no logit reaches places no box: every slice keeps its prompt-free mask.
    np.testing.assert_array_equal(segment_automatic(session, box_threshold=np.inf, keep="all"), unrefined)
    # One every logit reaches boxes the whole slice (every scale of it clips to the same box).
    whole = segment_automatic(session, box_threshold=-np.inf, keep="all", refine_iterations=1)
    rows, cols = session.slice_shape
    full = expand_box((0, 0, cols - 1, rows - 1), session.box_margin(), (rows, cols))
    for index in range(session.num_slices):
        expected = session.decode_slice(index, full)
        if not expected.any():
            expected = slice_from_volume(unrefined, session.voxel_axis, index)
        np.testing.assert_array_equal(slice_from_volume(whole, session.voxel_axis, index), expected)


def test_automatic_defaults_differ_for_volumes_and_2d_images():
    """Plumbing (tiny random model): arguments left out take AUTOMATIC_DEFAULTS of the image's kind,
    and box scales reach the decoder (a scale search changes the result here)."""
    from MedFMSegmentLib.inference.automatic import AUTOMATIC_DEFAULTS, BOX_SCALES

    model = tiny_random_model_for_tests()
    volume = _synthetic_case(0)[0]
    image_2d = MedicalImage.from_array(volume.array[2:3])
    for image, kind in ((volume, "volume"), (image_2d, "image")):
        session = SegmentationSession(model, image)
        chosen = segment_automatic(session, keep="all")
        own = AUTOMATIC_DEFAULTS[kind]
        np.testing.assert_array_equal(chosen, segment_automatic(
            session, keep="all", box_threshold=own.box_threshold, refine_iterations=own.refine_iterations,
            box_scales=own.box_scales, flip=own.flip))
        other = AUTOMATIC_DEFAULTS["image" if kind == "volume" else "volume"].box_threshold
        assert not np.array_equal(chosen, segment_automatic(session, keep="all", box_threshold=other))
    session = SegmentationSession(model, volume)
    # at threshold 0 the first boxes are smaller than the slice, so their scales differ
    assert not np.array_equal(segment_automatic(session, keep="all", box_threshold=0.0, box_scales=BOX_SCALES),
                              segment_automatic(session, keep="all", box_threshold=0.0, box_scales=(1.0,)))
    with pytest.raises(InputError):
        segment_automatic(session, box_scales=())


def test_automatic_flip_makes_prompt_free_output_mirror_equivariant():
    """Plumbing (tiny random model): with test-time flip, segmenting the mirrored image gives the
    mirror of the result, exactly; without it a random model does not (so this test can fail)."""
    model = tiny_random_model_for_tests()
    image = _synthetic_case(3)[0]
    session = SegmentationSession(model, image, axis="axial")
    mirror = session.mirrored()

    def both(flip):
        kwargs = {"refine_iterations": 0, "keep": "all", "flip": flip}
        return segment_automatic(session, **kwargs), segment_automatic(mirror, **kwargs)

    plain, plain_mirrored = both(False)
    assert not np.array_equal(plain_mirrored, plain[:, :, ::-1])
    flipped, flipped_mirrored = both(True)
    assert flipped.any()
    np.testing.assert_array_equal(flipped_mirrored, flipped[:, :, ::-1])
