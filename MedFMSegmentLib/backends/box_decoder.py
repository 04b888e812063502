"""The one-box decoder graph that OpenVINO runs for prompts on the CPU.

:class:`BoxDecoder` computes exactly what segment-anything's prompt encoder and
``MaskDecoder.predict_masks`` compute for one box (``multimask_output=False``), arranged for a
cheap per-prompt graph:

* **Token-major embedding.** It takes the image embedding as ``(1, H*W, C)``, the layout the
  two-way transformer works in. With ``(1, C, H, W)``, OpenVINO transposed the 4 MB embedding twice
  on every prompt; the caller transposes once per slice instead (:func:`image_tokens`).
* **Reassociated cross-attention.** Each cross-attention joins a few prompt tokens (``n = 7`` for a
  box: IoU token, mask tokens, two corners) with ``N = H*W = 4096`` image tokens. Written as
  segment-anything writes it, every such layer projects all 4096 image tokens twice (256 -> 128
  channels, or back), ten ``4096 x 256 x 128`` products per prompt, most of the decoder's work. In
  attention the projections can be folded into the few tokens instead
  (:func:`token_to_image_attention`, :func:`image_to_token_attention`): products of
  ``4096 x 256 x (heads * n) = 4096 x 256 x 56`` take their place. The arithmetic is the same up to
  rounding: equal to ~1e-5 in float32.

The change is worth it on the CPU, where the decoder is compute-bound (``python -m bench perf``
measures it), with OpenVINO's "snippets" fusion turned off for this graph (see :mod:`.openvino_graphs`):
it fused the new small products with their neighbours into slower kernels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BoxDecoder", "image_to_token_attention", "image_tokens", "token_to_image_attention", "two_way_block"]


def _per_head(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's weight ``(heads * d, C)`` -> ``(heads, d, C)``."""
    return weight.reshape(heads, weight.shape[0] // heads, weight.shape[1])


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Projected tokens ``(B, n, heads * d)`` -> ``(B, heads, n, d)``, as segment-anything splits them."""
    batch, count, internal = x.shape
    return x.reshape(batch, count, heads, internal // heads).transpose(1, 2)


def token_to_image_attention(attention: nn.Module, queries: torch.Tensor, image_keys: torch.Tensor,
                             image_values: torch.Tensor) -> torch.Tensor:
    """segment-anything ``Attention(q=queries, k=image_keys, v=image_values)`` for few queries.

    Args:
        attention: A segment-anything ``Attention`` layer (``q_proj``, ``k_proj``, ``v_proj``,
            ``out_proj``, ``num_heads``).
        queries: ``(B, n, C)`` prompt tokens, ``n`` small.
        image_keys, image_values: ``(B, N, C)`` image tokens.

    Returns:
        ``(B, n, C)``, as the layer's own forward.

    Per head ``h`` (``d`` channels), the scores ``q_h (X W_k,h^T + b_k,h)^T`` equal
    ``(q_h W_k,h) X^T`` plus a term constant along the image tokens, which the softmax ignores;
    and since each row of the softmax sums to 1, ``P_h (X W_v,h^T + b_v,h) = (P_h X) W_v,h^T + b_v,h``.
    So the image tokens meet only ``(heads * n, C)`` matrices, never a projection of all of them.
    """
    heads = attention.num_heads
    per_head = _split_heads(attention.q_proj(queries), heads)                          # B, h, n, d
    batch, _, count, depth = per_head.shape
    folded = (per_head @ _per_head(attention.k_proj.weight, heads)) / math.sqrt(depth)  # B, h, n, C
    scores = folded.reshape(batch, heads * count, -1) @ image_keys.transpose(1, 2)    # B, h*n, N
    weights = torch.softmax(scores, dim=-1)
    pooled = (weights @ image_values).reshape(batch, heads, count, -1)                # B, h, n, C
    values = pooled @ _per_head(attention.v_proj.weight, heads).transpose(1, 2)       # B, h, n, d
    values = values + attention.v_proj.bias.reshape(heads, 1, depth)
    return attention.out_proj(values.transpose(1, 2).reshape(batch, count, heads * depth))


def image_to_token_attention(attention: nn.Module, image_queries: torch.Tensor, keys: torch.Tensor,
                             values: torch.Tensor) -> torch.Tensor:
    """segment-anything ``Attention(q=image_queries, k=keys, v=values)`` for few keys.

    Args:
        attention: A segment-anything ``Attention`` layer.
        image_queries: ``(B, N, C)`` image tokens.
        keys, values: ``(B, n, C)`` prompt tokens, ``n`` small.

    Returns:
        ``(B, N, C)``, as the layer's own forward.

    Per head, ``(X W_q,h^T + b_q,h) k_h^T = X (W_q,h^T k_h^T) + b_q,h k_h^T``, and the output
    projection distributes over the heads: ``sum_h P_h (v_h W_o,h^T) + b_o``. The scores are laid
    out ``(B, heads, n, N)`` so that the softmax over the ``n`` keys runs along rows of ``N``
    contiguous values: OpenVINO's softmax over a few strided values, laid out ``(B, N, heads, n)``,
    is several times slower.
    """
    heads = attention.num_heads
    per_head_keys = _split_heads(attention.k_proj(keys), heads)                                 # B, h, n, d
    batch, _, count, depth = per_head_keys.shape
    folded = (per_head_keys @ _per_head(attention.q_proj.weight, heads)) / math.sqrt(depth)     # B, h, n, C
    offsets = (per_head_keys @ attention.q_proj.bias.reshape(heads, depth, 1)) / math.sqrt(depth)  # B, h, n, 1
    tokens = image_queries.shape[1]
    scores = (folded.reshape(batch, heads * count, -1) @ image_queries.transpose(1, 2))
    scores = scores.reshape(batch, heads, count, tokens) + offsets
    weights = torch.softmax(scores, dim=2).reshape(batch, heads * count, tokens)
    per_head_values = _split_heads(attention.v_proj(values), heads)                             # B, h, n, d
    out_weight = attention.out_proj.weight                                                      # C, h*d
    out_per_head = out_weight.reshape(out_weight.shape[0], heads, depth).permute(1, 2, 0)        # h, d, C
    mixed = (per_head_values @ out_per_head).reshape(batch, heads * count, -1)                  # B, h*n, C
    return weights.transpose(1, 2) @ mixed + attention.out_proj.bias


def two_way_block(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                  key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything ``TwoWayAttentionBlock.forward`` with the reassociated cross-attention."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        with_pe = queries + query_pe
        queries = queries + layer.self_attn(q=with_pe, k=with_pe, v=queries)
    queries = layer.norm1(queries)
    keys_with_pe = keys + key_pe
    attended = token_to_image_attention(layer.cross_attn_token_to_image, queries + query_pe, keys_with_pe, keys)
    queries = layer.norm2(queries + attended)
    queries = layer.norm3(queries + layer.mlp(queries))
    attended = image_to_token_attention(layer.cross_attn_image_to_token, keys_with_pe, queries + query_pe, queries)
    keys = layer.norm4(keys + attended)
    return queries, keys


class BoxDecoder(nn.Module):
    """Prompt encoder + mask decoder for one box on one image: the graph converted for prompts.

    See the module's docstring for how it differs from segment-anything's code (layout and
    attention arithmetic, not results).
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder

    def forward(self, embedding_tokens: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embedding_tokens (1, H*W, C)``, ``boxes (1, 4)`` in input pixels ->
        ``(logits (1, 1, 4H, 4W), iou (1, 1))``, as ``PromptableModel.decode``."""
        prompt_encoder, decoder = self.prompt_encoder, self.mask_decoder
        transformer = decoder.transformer
        sparse, dense = prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        batch, channels, height, width = dense.shape
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        keys = embedding_tokens + dense.flatten(2).transpose(1, 2)
        key_pe = prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
        queries = tokens
        for layer in transformer.layers:
            queries, keys = two_way_block(layer, queries, keys, tokens, key_pe)
        attended = token_to_image_attention(transformer.final_attn_token_to_image, queries + tokens,
                                            keys + key_pe, keys)
        hidden = transformer.norm_final_attn(queries + attended)
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(batch, channels, height, width))
        hyper = decoder.output_hypernetworks_mlps[0](hidden[:, 1])[:, None]
        up_batch, up_channels, up_height, up_width = upscaled.shape
        logits = hyper @ upscaled.reshape(up_batch, up_channels, up_height * up_width)
        iou = decoder.iou_prediction_head(hidden[:, 0])[:, 0:1]
        return logits.reshape(up_batch, 1, up_height, up_width), iou


def image_tokens(embedding: torch.Tensor) -> torch.Tensor:
    """``(1, C, H, W)`` embedding -> contiguous ``(1, H*W, C)``: :class:`BoxDecoder`'s input."""
    return embedding.flatten(2).transpose(1, 2).contiguous()
