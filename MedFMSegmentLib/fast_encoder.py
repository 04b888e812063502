"""Inference-only rewrites of the TinyViT image encoder (LiteMedSAM) for throughput on a GPU.

Both rewrites keep the encoder's arithmetic; they change how it is computed:

* :func:`fuse_attention` runs each window attention through
  :func:`torch.nn.functional.scaled_dot_product_attention` with the learned relative-position bias
  as an additive mask, instead of materialising the ``(windows, heads, N, N)`` score tensor,
  scaling, adding the bias, soft-maxing and multiplying in five separate kernels;
* :func:`fold_batchnorm` folds every ``Conv2d_BN`` pair into one convolution with a bias.

They are meant for a frozen inference copy (e.g. the float16 copy of
:meth:`MedFMSegmentLib.models.PromptableModel.encode_half`): folding drops the BatchNorm
statistics and the fused attention reads the bias buffer that eval mode caches. Never apply them
to a model that will be trained.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _is_tinyvit_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("attention_biases", "attention_bias_idxs", "qkv", "proj", "key_dim"))


def _fused_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT ``Attention.forward`` on ``(B, N, C)`` tokens through one fused attention call."""
    batch, tokens, _ = x.shape
    qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, -1)
    q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    bias = self.ab if hasattr(self, "ab") and not self.training else self.attention_biases[:, self.attention_bias_idxs]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dh))


def fuse_attention(encoder: nn.Module) -> int:
    """Route every TinyViT window attention of ``encoder`` through fused attention, in place.

    Returns:
        How many attention modules were changed (0 for a ViT encoder, which is left alone).
    """
    count = 0
    for module in encoder.modules():
        if _is_tinyvit_attention(module):
            if not module.training and not hasattr(module, "ab"):
                module.train(False)  # builds the cached (heads, N, N) bias buffer
            module.forward = types.MethodType(_fused_attention_forward, module)
            count += 1
    return count


def fold_batchnorm(encoder: nn.Module) -> int:
    """Replace every eval-mode ``Conv2d_BN`` (conv ``c`` + BatchNorm ``bn``) with one biased conv.

    Returns:
        How many pairs were folded.
    """
    count = 0
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Sequential) and hasattr(child, "fuse") and isinstance(getattr(child, "c", None), nn.Conv2d)
                    and isinstance(getattr(child, "bn", None), nn.BatchNorm2d)):
                folded = child.fuse().to(device=child.c.weight.device, dtype=child.c.weight.dtype)
                setattr(parent, name, folded.eval().requires_grad_(False))
                count += 1
    return count
