"""The OpenVINO CPU backend: same outputs as PyTorch, safe fallbacks, a disk cache in the user cache dir.

The real-model tests use the user's cache (``~/.cache/medfmsegment`` or ``$MEDFMSEGMENT_CACHE``),
so only the very first run converts LiteMedSAM (about half a minute on 2 cores); the cache tests
convert the tiny random model once into a temporary folder.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import dice
from MedFMSegmentLib import backends
from MedFMSegmentLib.backends import accelerate, weights_digest
from MedFMSegmentLib.backends import int8 as quantization
from MedFMSegmentLib.backends import openvino as acceleration
from MedFMSegmentLib.backends import openvino_graphs as graphs
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.io import read_image
from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.models import tiny_random_model_for_tests
from MedFMSegmentLib.inference import SegmentationSession
from MedFMSegmentLib.prompts import mask_bbox

openvino = pytest.importorskip("openvino")


# ----------------------------------------------------------------------------- real LiteMedSAM
@pytest.fixture(scope="module")
def torch_litemedsam():
    return load_model("litemedsam", device="cpu", backend="torch")


@pytest.fixture(scope="module")
def f32_litemedsam():
    """OpenVINO in float32, whatever the CPU: the backend that must reproduce PyTorch."""
    return load_model("litemedsam", device="cpu", precision="f32")


@pytest.fixture(scope="module")
def real_cases(data_dir):
    """Two HC18 ultrasound images and one hippocampus MRI slice: ``(image, k, truth)``."""
    hc18 = data_dir / "hc18_fetal_head_us"
    cases = []
    for name in ("010_HC", "042_HC"):
        image = read_image(hc18 / "images" / f"{name}.png")
        truth = read_image(hc18 / "masks" / f"{name}_mask.png").array[0] > 0
        cases.append((image, 0, truth))
    hippo = data_dir / "msd_hippocampus_mri"
    image = read_image(hippo / "imagesTr" / "hippocampus_001.nii.gz")
    truth = read_image(hippo / "labelsTr" / "hippocampus_001.nii.gz").array > 0
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    cases.append((image, k, truth[k]))
    return cases


@pytest.fixture(scope="module")
def real_sessions(real_cases, f32_litemedsam, torch_litemedsam):
    """``(float32 OpenVINO session, torch session, k, truth)`` per real case.

    Each slice is embedded once per backend here; the tests reuse the cached embeddings.
    """
    sessions = []
    for image, k, truth in real_cases:
        fast, plain = SegmentationSession(f32_litemedsam, image), SegmentationSession(torch_litemedsam, image)
        fast.embedding(k)
        plain.embedding(k)
        sessions.append((fast, plain, k, truth))
    return sessions


def test_litemedsam_uses_openvino_by_default_on_cpu(litemedsam, torch_litemedsam, f32_litemedsam):
    assert litemedsam.backend == "openvino"
    assert litemedsam.accelerator.precision == ("bf16" if backends.cpu_has_native_bf16() else "f32")
    assert f32_litemedsam.backend == "openvino" and f32_litemedsam.accelerator.precision == "f32"
    assert torch_litemedsam.backend == "torch" and torch_litemedsam.accelerator is None


def test_precision_names(monkeypatch):
    assert backends.resolve_precision("f32") == "f32"
    native = backends.cpu_has_native_bf16()
    # bf16 is never emulated: without native support it means f32.
    assert backends.resolve_precision("bf16") == backends.resolve_precision("auto") == ("bf16" if native else "f32")
    monkeypatch.setenv(backends.PRECISION_ENV, "f32")
    assert backends.resolve_precision(None) == "f32"
    with pytest.raises(InputError, match="unknown precision"):
        backends.resolve_precision("int4")
    with pytest.raises(InputError, match="unknown precision"):
        load_model("litemedsam", device="cpu", precision="fp8")


needs_bf16 = pytest.mark.skipif(not backends.cpu_has_native_bf16(),
                                reason="this CPU has no native bfloat16 (AVX-512-BF16 or AMX)")


@needs_bf16
def test_bf16_masks_agree_with_torch_on_real_images(real_cases, litemedsam, real_sessions):
    """bf16 changes the embedding by a few per cent; the masks and their Dice barely move."""
    assert litemedsam.accelerator.precision == "bf16"
    for (image, k, truth), (_, plain, _, _) in zip(real_cases, real_sessions):
        box = mask_bbox(truth)
        fast = SegmentationSession(litemedsam, image)
        relative = float((fast.embedding(k) - plain.embedding(k)).norm() / plain.embedding(k).norm())
        assert 0 < relative < 0.15
        a, b = fast.predict_slice(k, box), plain.predict_slice(k, box)
        assert dice(a, b) >= 0.95
        assert abs(dice(a, truth) - dice(b, truth)) < 0.03


@needs_bf16
def test_bf16_check_failure_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(acceleration.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(graphs, "_process_cache", {})
    monkeypatch.setattr(graphs, "_BF16_MAX_RELATIVE_ERROR", 1e-9)  # as if the bf16 kernels were broken
    model = accelerate(tiny_random_model_for_tests(), "openvino", "bf16")
    assert model.backend == "torch"
    assert "differs from f32" in caplog.text
    assert not list(tmp_path.rglob("check-bf16-*.json"))


@needs_bf16
def test_bf16_check_runs_once_per_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(acceleration.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(graphs, "_process_cache", {})
    model = accelerate(tiny_random_model_for_tests(), "openvino", "bf16")
    assert model.backend == "openvino" and model.accelerator.precision == "bf16"
    markers = sorted(tmp_path.rglob("check-bf16-*.json"))
    assert len(markers) == 2  # encoder and decoder
    monkeypatch.setattr(graphs, "_process_cache", {})
    monkeypatch.setattr(graphs, "_check_relative", lambda *a, **k: pytest.fail("checked again"))
    again = accelerate(tiny_random_model_for_tests(), "openvino", "bf16")
    assert again.accelerator.precision == "bf16"


# ----------------------------------------------------------------------------- INT8 (explicit only)
needs_nncf = pytest.mark.skipif(not quantization.nncf_available(), reason="NNCF is not installed")


def test_int8_without_nncf_is_a_clear_input_error(monkeypatch, tmp_path, capsys, data_dir):
    from MedFMSegmentLib.cli import main

    monkeypatch.setattr(quantization, "nncf_available", lambda: False)
    with pytest.raises(InputError, match="needs NNCF"):
        load_model("litemedsam", device="cpu", precision="int8")
    out = tmp_path / "mask.png"
    image = data_dir / "hc18_fetal_head_us" / "images" / "010_HC.png"
    assert main(["segment", str(image), "-o", str(out), "--precision", "int8", "--box", "100", "100", "0",
                 "200", "200", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs NNCF" in err and "Traceback" not in err
    assert not out.exists()
    assert backends.resolve_precision("auto") != "int8"  # never chosen on its own


@needs_nncf
def test_int8_encoder_is_quantized_once_and_cached(tmp_path, monkeypatch, capsys):
    """Tiny random model (plumbing only): INT8 graph checked, cached on disk, reused without NNCF."""
    monkeypatch.setenv(acceleration.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(graphs, "_process_cache", {})
    model = accelerate(tiny_random_model_for_tests(), "openvino", "int8")
    assert model.backend == "openvino" and model.accelerator.precision == "int8"
    assert capsys.readouterr().out == ""  # NNCF's progress goes to stderr, never into the caller's stdout
    folders = list((tmp_path / "openvino").glob("*encoder-int8-*"))
    assert len(folders) == 1
    meta = json.loads((folders[0] / "meta.json").read_text(encoding="utf-8"))
    assert meta["precision"] == "int8" and 0 < meta["relative_error_vs_f32"] < graphs._INT8_MAX_RELATIVE_ERROR
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        got, expected = model.encode(x), tiny_random_model_for_tests().encode(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float((got - expected).norm() / expected.norm()) < graphs._INT8_MAX_RELATIVE_ERROR
    monkeypatch.setattr(graphs, "_process_cache", {})
    monkeypatch.setattr(quantization, "quantize_encoder", lambda *a, **k: pytest.fail("quantized again"))
    again = accelerate(tiny_random_model_for_tests(), "openvino", "int8")
    assert again.accelerator.precision == "int8"
    assert np.array_equal(quantization.calibration_images(32, 3, seed=5)[2], quantization.calibration_images(32, 3, seed=5)[2])


def test_float_stem_follows_the_encoder(torch_litemedsam):
    """The convolutions INT8 leaves in float: TinyViT's two-convolution patch embedding, a ViT's one."""
    assert graphs._patch_embedding_convolutions(torch_litemedsam) == 2
    assert graphs._patch_embedding_convolutions(tiny_random_model_for_tests()) == 1


@needs_nncf
def test_int8_masks_agree_with_torch_on_real_images(real_cases, real_sessions):
    """The real LiteMedSAM in INT8 (quantized once into the user cache: about two minutes on 2 cores)."""
    model = load_model("litemedsam", device="cpu", precision="int8")
    assert model.backend == "openvino" and model.accelerator.precision == "int8"
    for (image, k, truth), (_, plain, _, _) in zip(real_cases, real_sessions):
        box = mask_bbox(truth)
        a, b = SegmentationSession(model, image).predict_slice(k, box), plain.predict_slice(k, box)
        assert dice(a, b) >= 0.9
        assert abs(dice(a, truth) - dice(b, truth)) < 0.06


def test_embeddings_match_torch_on_real_slices(real_sessions):
    for fast, plain, k, _ in real_sessions:
        a, b = fast.embedding(k), plain.embedding(k)
        assert a.shape == b.shape == (1, 256, 64, 64) and a.dtype == b.dtype == torch.float32
        assert float((a - b).abs().max()) < 1e-3


def test_decode_matches_torch_on_real_slice(f32_litemedsam, torch_litemedsam, real_sessions):
    _, plain, k, truth = real_sessions[0]
    embedding = plain.embedding(k)
    box = torch.from_numpy(plain.transform.box_to_input(mask_bbox(truth)))[None]
    with torch.inference_mode():
        fast_logits, fast_iou = f32_litemedsam.decode(embedding, boxes=box)
        logits, iou = torch_litemedsam.decode(embedding, boxes=box)
    assert fast_logits.shape == logits.shape == (1, 1, 256, 256) and fast_iou.shape == iou.shape == (1, 1)
    assert fast_logits.dtype == logits.dtype == torch.float32
    assert float((fast_logits - logits).abs().max()) < 1e-2
    assert float((fast_iou - iou).abs().max()) < 1e-3


def test_box_decoder_module_is_the_torch_decoder(torch_litemedsam, real_sessions):
    """The graph's module, in PyTorch, against PromptableModel.decode: layout and attention
    arithmetic are rearranged (box_decoder.py), results are not."""
    module = acceleration.BoxDecoder(torch_litemedsam).eval()
    for _, plain, k, truth in real_sessions:
        embedding = plain.embedding(k)
        box = torch.from_numpy(plain.transform.box_to_input(mask_bbox(truth)))[None]
        with torch.inference_mode():
            logits, iou = module(acceleration.image_tokens(embedding), box)
            expected_logits, expected_iou = torch_litemedsam.decode(embedding, boxes=box)
        assert logits.shape == expected_logits.shape and iou.shape == expected_iou.shape
        assert float((logits - expected_logits).abs().max()) < 1e-3
        assert float((iou - expected_iou).abs().max()) < 1e-5


def test_decoder_reuses_tokens_only_for_the_same_embedding(f32_litemedsam, torch_litemedsam, real_sessions):
    """Prompts alternating between slices never see another slice's cached token-major copy."""
    accelerator = f32_litemedsam.accelerator
    pairs = []
    for _, plain, k, truth in real_sessions[:2]:
        box = torch.from_numpy(plain.transform.box_to_input(mask_bbox(truth)))[None]
        pairs.append((plain.embedding(k), box))
    with torch.inference_mode():
        for embedding, box in pairs + pairs[::-1] + pairs:
            got, _ = f32_litemedsam.decode(embedding, boxes=box)
            expected, _ = torch_litemedsam.decode(embedding, boxes=box)
            assert float((got - expected).abs().max()) < 1e-2
        first = accelerator._tokens_of(pairs[0][0])
        assert accelerator._tokens_of(pairs[0][0].clone()) is first  # same values: no new copy
        # One buffer refilled slice after slice, as DecoderStep does (an inference tensor: no version counter).
        buffer = torch.empty_like(pairs[0][0])
        for embedding, box in pairs + pairs[::-1]:
            buffer.copy_(embedding)
            got, _ = f32_litemedsam.decode(buffer, boxes=box)
            expected, _ = torch_litemedsam.decode(embedding, boxes=box)
            assert float((got - expected).abs().max()) < 1e-2
        buffer.mul_(2.0)
        assert np.array_equal(accelerator._tokens_of(buffer), acceleration.image_tokens(buffer).numpy())


def test_masks_agree_with_torch_on_real_images(real_sessions):
    for fast, plain, k, truth in real_sessions:
        box = mask_bbox(truth)
        a, b = fast.predict_slice(k, box), plain.predict_slice(k, box)
        assert b.any()
        assert dice(a, b) >= 0.99


def test_backend_torch_and_unknown(torch_litemedsam):
    assert torch_litemedsam.backend == "torch"
    with pytest.raises(InputError, match="unknown backend"):
        load_model("litemedsam", device="cpu", backend="tensorrt")


# ----------------------------------------------------------------------------- tiny model: cache and fallbacks
@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """The tiny random model converted once into a temporary cache folder given by the env var."""
    folder = tmp_path_factory.mktemp("medfm_cache")
    saved = os.environ.get(acceleration.CACHE_ENV)
    os.environ[acceleration.CACHE_ENV] = str(folder)
    cwd_before = sorted(os.listdir(os.getcwd()))
    model = accelerate(tiny_random_model_for_tests(), "openvino", "f32")
    yield folder, model, cwd_before
    if saved is None:
        os.environ.pop(acceleration.CACHE_ENV, None)
    else:
        os.environ[acceleration.CACHE_ENV] = saved


def test_disk_cache_in_env_dir_and_reused(tiny_cache, monkeypatch):
    folder, model, cwd_before = tiny_cache
    assert model.backend == "openvino"
    entries = sorted(p.name for p in (folder / "openvino").iterdir())
    assert len(entries) == 2 and not any(name.startswith(".") for name in entries)  # no temporary leftovers
    for entry in entries:
        assert {p.name for p in (folder / "openvino" / entry).iterdir()} == {"model.xml", "model.bin", "meta.json"}
    assert sorted(os.listdir(os.getcwd())) == cwd_before  # nothing written into the working folder
    # A new process (empty in-memory cache) must reuse the files without converting.
    monkeypatch.setattr(graphs, "_process_cache", {})

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the disk cache")

    monkeypatch.setattr(graphs, "_convert", no_conversion)
    monkeypatch.setattr(acceleration, "ImageEncoder", no_conversion)  # the rewritten copy is made only to convert
    again = accelerate(tiny_random_model_for_tests(), "openvino", "f32")
    assert again.backend == "openvino"
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(again.encode(x), tiny_random_model_for_tests().encode(x), atol=1e-4)


def test_cache_key_follows_weights():
    assert weights_digest(tiny_random_model_for_tests(seed=0)) == weights_digest(tiny_random_model_for_tests(seed=0))
    assert weights_digest(tiny_random_model_for_tests(seed=0)) != weights_digest(tiny_random_model_for_tests(seed=1))


def test_calls_outside_the_graphs_run_in_torch(tiny_cache):
    _, _, _ = tiny_cache
    model = accelerate(tiny_random_model_for_tests(), "openvino", "f32")  # in-process cache: no conversion
    reference = tiny_random_model_for_tests()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        embedding = reference.encode(x)
        points, labels = torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])
        got, expected = model.decode(embedding, points=points, point_labels=labels), \
            reference.decode(embedding, points=points, point_labels=labels)
        assert torch.equal(got[0], expected[0])  # clicks: PyTorch, bit for bit
        two_boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0], [10.0, 10.0, 30.0, 30.0]])
        assert torch.equal(model.decode(embedding, boxes=two_boxes)[0], reference.decode(embedding, boxes=two_boxes)[0])
        one_box = two_boxes[:1]
        assert torch.allclose(model.decode(embedding, boxes=one_box)[0], reference.decode(embedding, boxes=one_box)[0],
                              atol=1e-4)
    # With autograd on, PyTorch runs and gradients flow.
    assert model.encode(x).requires_grad
    assert model.backend == "openvino"


def test_changed_weights_fall_back_to_torch(tiny_cache):
    from MedFMSegmentLib.finetune.adapters import inject_lora

    x = torch.rand(1, 3, 64, 64)
    for change in ("in_place", "lora"):
        model = accelerate(tiny_random_model_for_tests(), "openvino", "f32")
        assert model.backend == "openvino"
        if change == "in_place":
            with torch.no_grad():
                next(model.image_encoder.parameters()).add_(0.5)
        else:
            inject_lora(model, rank=2, alpha=4)
            with torch.no_grad():
                for name, p in model.image_encoder.named_parameters():
                    if "lora_B" in name:
                        p.fill_(0.1)  # LoRA B starts at zero: make the adapter change the output
        with torch.inference_mode():
            got = model.encode(x)
        model.accelerator = None
        with torch.inference_mode():
            expected = model.encode(x)
        assert torch.equal(got, expected), change
        assert not torch.allclose(got, tiny_random_model_for_tests().encode(x).detach(), atol=1e-3)


def test_released_decoder_trains_in_torch_without_warning(tiny_cache, caplog):
    """Frozen-encoder fine-tuning: the decoder is handed to PyTorch up front, the encoder graph stays."""
    model = accelerate(tiny_random_model_for_tests(), "openvino", "f32")
    model.accelerator.release("decoder")
    with torch.no_grad():
        next(model.mask_decoder.parameters()).add_(0.5)
    x = torch.rand(1, 3, 64, 64)
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    with caplog.at_level("WARNING"), torch.inference_mode():
        embedding = model.encode(x)
        got, _ = model.decode(embedding, boxes=boxes)
    assert not [r for r in caplog.records if "changed after OpenVINO" in r.getMessage()]
    assert model.backend == "openvino"
    accelerator, model.accelerator = model.accelerator, None
    with torch.inference_mode():
        assert torch.equal(got, model.decode(embedding, boxes=boxes)[0])
    with pytest.raises(ValueError):
        accelerator.release("neck")


def test_auto_leaves_other_models_on_torch():
    assert accelerate(tiny_random_model_for_tests(), "auto").backend == "torch"
    assert accelerate(tiny_random_model_for_tests(), "torch").backend == "torch"


def test_conversion_failure_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(acceleration.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(graphs, "_process_cache", {})

    def broken(*args, **kwargs):
        raise RuntimeError("simulated converter failure")

    monkeypatch.setattr(graphs, "_convert", broken)
    model = accelerate(tiny_random_model_for_tests(seed=3), "openvino")
    assert model.backend == "torch"
    assert "simulated converter failure" in caplog.text
    assert not (tmp_path / "openvino").exists() or not any((tmp_path / "openvino").iterdir())


def test_decoder_change_keeps_encoder_accelerated(tiny_cache):
    model = accelerate(tiny_random_model_for_tests(), "openvino", "f32")
    with torch.no_grad():
        next(model.mask_decoder.parameters()).add_(0.5)  # e.g. frozen-encoder fine-tuning
    x, box = torch.rand(1, 3, 64, 64), torch.tensor([[5.0, 6.0, 40.0, 50.0]])
    with torch.inference_mode():
        embedding = model.encode(x)
        logits, _ = model.decode(embedding, boxes=box)
    assert model.backend == "openvino" and "decoder" in model.accelerator._stale
    assert "encoder" not in model.accelerator._stale
    model.accelerator = None
    with torch.inference_mode():
        assert torch.equal(logits, model.decode(embedding, boxes=box)[0])


def test_quiet_torch_threads_only_around_openvino(f32_litemedsam, torch_litemedsam):
    """One PyTorch thread inside the block for an OpenVINO model (restored after, even on error);
    a PyTorch model keeps its threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with backends.quiet_torch_threads(f32_litemedsam):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), backends.quiet_torch_threads(f32_litemedsam):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with backends.quiet_torch_threads(torch_litemedsam):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_graphs_compile_with_the_configured_threads_inside_a_quiet_block():
    """Inside ``quiet_torch_threads`` PyTorch runs on one thread, but a graph first compiled there
    (and its cache keys) must still take the configured count, restored when the block ends."""
    from types import SimpleNamespace

    from MedFMSegmentLib.backends import quiet_torch_threads
    from MedFMSegmentLib.backends.openvino_graphs import _compile_config, compute_threads

    on_openvino = SimpleNamespace(accelerator=SimpleNamespace(name="openvino"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with quiet_torch_threads(on_openvino):
            assert torch.get_num_threads() == 1
            assert compute_threads() == 2 and _compile_config()["INFERENCE_NUM_THREADS"] == 2
        assert torch.get_num_threads() == 2 and compute_threads() == 2
    finally:
        torch.set_num_threads(before)
