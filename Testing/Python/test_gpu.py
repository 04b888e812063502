"""CUDA paths with the real LiteMedSAM: batched float16 embedding, LoRA training under autocast.

These run only where a CUDA GPU is present (CI has none: they skip there, with the reason).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DATA_DIR, dice

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HIPPOCAMPUS = DATA_DIR / "msd_hippocampus_mri"


@pytest.fixture(scope="module")
def cuda_model():
    from MedFMSegmentLib.loading import load_model

    return load_model("litemedsam", device="cuda")


def _case(n: int):
    from MedFMSegmentLib.io import read_image, read_label

    name = f"hippocampus_{n:03d}.nii.gz"
    if not (HIPPOCAMPUS / "imagesTr" / name).is_file():
        pytest.skip(f"real hippocampus case {name} absent")
    return read_image(HIPPOCAMPUS / "imagesTr" / name), read_label(HIPPOCAMPUS / "labelsTr" / name)


def _bbox(mask: np.ndarray) -> tuple[int, ...]:
    k, j, i = np.nonzero(mask)
    return (int(i.min()), int(j.min()), int(k.min()), int(i.max()), int(j.max()), int(k.max()))


def test_batched_float16_embeddings_match_float32_reference(cuda_model):
    """GPU batch path (resize on the GPU, float16 encoder) against the float32 one-slice CPU path."""
    from MedFMSegmentLib.inference import SegmentationSession

    image, _ = _case(1)
    fast = SegmentationSession(cuda_model, image, axis="axial")
    fast.embed_slices(range(fast.num_slices), batch_size=16)
    reference = SegmentationSession(cuda_model, image, axis="axial")
    for k in (0, fast.num_slices // 2, fast.num_slices - 1):
        x = reference.transform.image_to_input(reference.slice_image(k))[None].cuda()
        with torch.inference_mode():
            expected = cuda_model.encode(x).float()
        got = fast.embedding(k)
        assert got.dtype == torch.float32 and got.device.type == "cuda"
        relative = (torch.linalg.norm(got - expected) / torch.linalg.norm(expected)).item()
        assert relative < 1e-2, f"slice {k}: float16 embedding differs by {relative:.4f}"


def test_gpu_3d_box_matches_cpu(cuda_model, litemedsam):
    """The same 3D box on GPU (prefetched float16 batches) and on CPU (lazy float32): same mask."""
    from MedFMSegmentLib.inference import SegmentationSession
    from MedFMSegmentLib.prompts import Prompts

    image, label = _case(3)
    truth = label.array > 0
    prompts = Prompts(box=_bbox(truth))
    gpu = SegmentationSession(cuda_model, image).segment(prompts)
    cpu = SegmentationSession(litemedsam, image).segment(prompts)
    assert dice(gpu, cpu) > 0.97
    assert abs(dice(gpu, truth) - dice(cpu, truth)) < 0.02


@pytest.mark.parametrize("encoder, adapter_channels, scope", [("lora", 0, "all"), ("lora", 32, "all"),
                                                             ("frozen", 64, "automatic")])
def test_finetune_on_gpu_reloads_identically(tmp_path, encoder, adapter_channels, scope):
    """Fine-tuning under CUDA autocast (LoRA, LoRA with an embedding adapter, frozen encoder with
    one): the saved adapter reloads to the same outputs (BatchNorm kept frozen), and the session's
    CUDA-graph decoder step decodes a box like the eager decoder (through the embedding adapter
    where its scope is "all"). The seven passed on an H100 before scopes existed (every adapter
    then acted on every prompt, as "all" does)."""
    from MedFMSegmentLib.finetune.adapters import load_adapted_model, save_adapter
    from MedFMSegmentLib.finetune.trainer import FinetuneConfig, finetune
    from MedFMSegmentLib.inference import SegmentationSession

    cases = [_case(1), _case(3)]
    model, metadata = finetune(cases, FinetuneConfig(steps=20, validate_every=10, device="cuda", encoder=encoder,
                                                     embedding_adapter_channels=adapter_channels,
                                                     embedding_adapter_scope=scope))
    assert metadata["encoder"] == encoder and metadata["device"].startswith("cuda")
    assert (metadata["embedding_adapter"] or {}).get("channels", 0) == adapter_channels
    folder = save_adapter(model, tmp_path / "adapter", metadata)
    reloaded, _ = load_adapted_model(folder, device="cuda")
    session = SegmentationSession(reloaded, cases[0][0], axis="axial")
    index = session.num_slices // 2
    x = session.transform.image_to_input(session.slice_image(index))[None].cuda()
    with torch.inference_mode():
        e1, e2 = model.encode(x), reloaded.encode(x)
        assert torch.allclose(e1, e2, atol=1e-5)
        assert torch.allclose(model.decode(e1)[0], reloaded.decode(e2)[0], atol=1e-4)
    truth = cases[0][1].array[index] > 0
    rows, cols = np.nonzero(truth)
    box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
    graphed = session.decode_slice(index, box)  # CUDA graph (DecoderStep)
    t = session.transform
    with torch.inference_mode():
        logits, _ = reloaded.decode(session.embedding(index), boxes=torch.from_numpy(t.box_to_input(box))[None].cuda())
        eager = (t.logits_to_slice(logits)[0] > 0).cpu().numpy()
    assert graphed.any() and np.mean(graphed != eager) < 1e-3


def test_graphed_decoder_step_matches_eager(cuda_model):
    """The CUDA-graph decoder step gives the eager step's masks and statistics, box after box."""
    from MedFMSegmentLib.decoder_step import DecoderStep
    from MedFMSegmentLib.inference import SegmentationSession

    image, label = _case(3)
    session = SegmentationSession(cuda_model, image, axis="axial")
    graphed = DecoderStep(cuda_model, session.transform)
    eager = DecoderStep(cuda_model, session.transform, use_graph=False)
    truth = label.array > 0
    for k in np.flatnonzero(truth.any(axis=(1, 2)))[::3]:
        rows, cols = np.nonzero(truth[k])
        box = (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))
        mask_g, stats_g = graphed(session.embedding(int(k)), box)
        assert graphed.graphed, graphed.graph_error
        mask_e, stats_e = eager(session.embedding(int(k)), box)
        assert torch.equal(mask_g, mask_e) and stats_g == stats_e
        graphed.set_previous(mask_g)
        eager.set_previous(mask_e)


def test_half_encoder_follows_weight_changes(cuda_model):
    """The float16 encoder copy is rebuilt when the encoder's weights change (no stale embeddings)."""
    import copy

    model = copy.deepcopy(cuda_model)
    x = torch.rand(2, 3, model.image_size, model.image_size, device="cuda")
    with torch.inference_mode():
        before = model.encode_half(x).float()
        reference = model.encode(x).float()
    assert (torch.linalg.norm(before - reference) / torch.linalg.norm(reference)).item() < 1e-2
    with torch.no_grad():
        next(model.image_encoder.parameters()).mul_(1.5)
    with torch.inference_mode():
        after = model.encode_half(x).float()
        changed = model.encode(x).float()
    assert (torch.linalg.norm(after - changed) / torch.linalg.norm(changed)).item() < 1e-2
    assert not torch.allclose(after, before)
