"""Inference rewrites of the TinyViT encoder keep the real LiteMedSAM's embeddings."""

from __future__ import annotations

import copy

import pytest
import torch

from MedFMSegmentLib.backends.fast_encoder import (fold_batchnorm, for_openvino, fuse_attention, permute_around_convolutions,
                                          split_qkv)
from MedFMSegmentLib.models import tiny_random_model_for_tests


@pytest.fixture(scope="module")
def torch_encoder():
    from MedFMSegmentLib.loading import load_model

    return load_model("litemedsam", device="cpu", backend="torch").image_encoder


def _real_like_images(count: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    disk = ((xx / 0.5) ** 2 + (yy / 0.3) ** 2 <= 1).float()
    images = 0.2 + 0.6 * disk + 0.1 * torch.rand(count, 256, 256, generator=generator)
    return images[:, None].expand(count, 3, 256, 256).contiguous()


def test_fused_and_folded_encoder_matches_litemedsam(torch_encoder):
    fast = copy.deepcopy(torch_encoder).eval()
    assert fold_batchnorm(fast) == 27  # every Conv2d_BN of TinyViT-5M
    assert fuse_attention(fast) == 10  # every window attention
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    images = _real_like_images()
    with torch.inference_mode():
        expected, got = torch_encoder(images), fast(images)
    assert got.shape == expected.shape == (2, 256, 64, 64)
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())


def test_original_encoder_is_untouched(torch_encoder):
    before = {k: v.clone() for k, v in torch_encoder.state_dict().items()}
    fast = copy.deepcopy(torch_encoder).eval()
    fold_batchnorm(fast)
    fuse_attention(fast)
    after = torch_encoder.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in torch_encoder.modules())


def test_vit_encoders_are_left_alone():
    """The SAM ViT (here the tiny random ViT for plumbing) has neither TinyViT part."""
    encoder = copy.deepcopy(tiny_random_model_for_tests().image_encoder).eval()
    assert fold_batchnorm(encoder) == 0
    assert fuse_attention(encoder) == 0
    assert split_qkv(encoder) == 0
    assert permute_around_convolutions(encoder) == 0


def test_openvino_rewrites_keep_the_embedding(torch_encoder):
    """The copy OpenVINO converts: separate q/k/v projections and 4D permutes, the same values."""
    counted = copy.deepcopy(torch_encoder).eval()
    assert split_qkv(counted) == 10  # every window attention
    assert permute_around_convolutions(counted) == 13  # 10 TinyViT blocks + 3 patch mergings
    assert not any(hasattr(m, "qkv") for m in counted.modules())
    rewritten = for_openvino(torch_encoder)
    assert any(hasattr(m, "qkv") for m in torch_encoder.modules())  # the original keeps its layers
    images = _real_like_images()
    with torch.inference_mode():
        expected, got = torch_encoder(images), rewritten(images)
    assert got.shape == expected.shape == (2, 256, 64, 64)
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max())
