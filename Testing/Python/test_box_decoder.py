"""The decoder graph's reassociated attention against segment-anything's own layers.

Random weights and inputs in float64 (arithmetic checks, not model behaviour); the real LiteMedSAM
decoder is compared on real slices in test_acceleration.py.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock

from MedFMSegmentLib.backends.box_decoder import image_to_token_attention, token_to_image_attention, two_way_block


def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` in float64 with every parameter random (biases included, which the algebra must carry)."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.3)
    return module


@pytest.mark.parametrize("channels,heads,downsample", [(64, 8, 2), (32, 4, 1), (48, 2, 2)])
def test_cross_attention_both_ways_equals_segment_anything(channels, heads, downsample):
    attention = _randomized(Attention(channels, heads, downsample_rate=downsample), seed=channels + heads)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 7, channels, generator=generator, dtype=torch.float64)
    image = torch.randn(2, 50, channels, generator=generator, dtype=torch.float64) * 2
    image_values = torch.randn(2, 50, channels, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = attention(q=tokens, k=image, v=image_values)
        got = token_to_image_attention(attention, tokens, image, image_values)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-10, rtol=1e-9)
        expected = attention(q=image, k=tokens, v=tokens * 0.5)
        got = image_to_token_attention(attention, image, tokens, tokens * 0.5)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("skip_first_layer_pe", [True, False])
def test_two_way_block_equals_segment_anything(skip_first_layer_pe):
    block = _randomized(TwoWayAttentionBlock(64, 8, mlp_dim=96, skip_first_layer_pe=skip_first_layer_pe), seed=3)
    generator = torch.Generator().manual_seed(2)
    queries, query_pe = (torch.randn(1, 7, 64, generator=generator, dtype=torch.float64) for _ in range(2))
    keys, key_pe = (torch.randn(1, 36, 64, generator=generator, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        expected = block(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
        got = two_way_block(block, queries, keys, query_pe, key_pe)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-9, rtol=1e-9)
