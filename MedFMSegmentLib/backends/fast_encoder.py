"""Inference-only rewrites of the TinyViT image encoder (LiteMedSAM).

All of them keep the encoder's arithmetic; they change how it is computed.

For throughput on a GPU:

* :func:`fuse_attention` runs each window attention through
  :func:`torch.nn.functional.scaled_dot_product_attention` with the learned relative-position bias
  as an additive mask, instead of materialising the ``(windows, heads, N, N)`` score tensor,
  scaling, adding the bias, soft-maxing and multiplying in five separate kernels;
* :func:`fold_batchnorm` folds every ``Conv2d_BN`` pair into one convolution with a bias.

For the graph OpenVINO runs on the CPU (:func:`split_qkv` and :func:`permute_around_convolutions`,
applied together by :func:`for_openvino`): TinyViT turns tokens ``(B, H*W, C)`` into images for
its convolutions with 3D transposes, and splits one fused query/key/value projection per head.
OpenVINO ran both with slow reference kernels (generic ``Transpose``, ``VariadicSplit``); the
rewrites avoid them. PyTorch gives the same embedding bit for bit.

They are meant for a frozen inference copy (e.g. the float16 copy of
:class:`~.cuda_half.HalfPrecisionEncoder`, or the copy converted for OpenVINO):
folding drops the BatchNorm statistics, and the attention rewrites read the bias buffer that eval
mode caches. Never apply them to a model that will be trained.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fold_batchnorm", "for_openvino", "fuse_attention", "permute_around_convolutions", "split_qkv"]


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


def _tinyvit_bias(attention: nn.Module) -> torch.Tensor:
    return (attention.ab if hasattr(attention, "ab") and not attention.training
            else attention.attention_biases[:, attention.attention_bias_idxs])


def _split_qkv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT ``Attention.forward`` with separate query, key and value projections."""
    batch, tokens, _ = x.shape
    x = self.norm(x)
    q, k, v = (projection(x).view(batch, tokens, self.num_heads, -1).permute(0, 2, 1, 3)
               for projection in (self.q_proj, self.k_proj, self.v_proj))
    attention = ((q @ k.transpose(-2, -1)) * self.scale + _tinyvit_bias(self)).softmax(dim=-1)
    return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, self.dh))


def split_qkv(encoder: nn.Module) -> int:
    """Replace each TinyViT attention's fused ``qkv`` projection by ``q_proj``, ``k_proj`` and
    ``v_proj``, in place.

    ``qkv``'s outputs are laid out per head as ``[query (key_dim), key (key_dim), value (d)]``;
    each new projection takes its rows, so every output value is the same dot product as before.

    Returns:
        How many attention modules were changed (0 for a ViT encoder, which is left alone).
    """
    count = 0
    for module in encoder.modules():
        if not _is_tinyvit_attention(module) or not isinstance(getattr(module, "qkv", None), nn.Linear):
            continue
        if not module.training and not hasattr(module, "ab"):
            module.train(False)  # builds the cached (heads, N, N) bias buffer
        fused = module.qkv
        per_head = 2 * module.key_dim + module.d
        weight = fused.weight.detach().view(module.num_heads, per_head, fused.in_features)
        bias = fused.bias.detach().view(module.num_heads, per_head)
        bounds = {"q_proj": (0, module.key_dim), "k_proj": (module.key_dim, 2 * module.key_dim),
                  "v_proj": (2 * module.key_dim, per_head)}
        for name, (start, stop) in bounds.items():
            projection = nn.Linear(fused.in_features, module.num_heads * (stop - start),
                                   device=fused.weight.device, dtype=fused.weight.dtype)
            with torch.no_grad():
                projection.weight.copy_(weight[:, start:stop].reshape(-1, fused.in_features))
                projection.bias.copy_(bias[:, start:stop].reshape(-1))
            setattr(module, name, projection.requires_grad_(False))
        del module.qkv
        module.forward = types.MethodType(_split_qkv_forward, module)
        count += 1
    return count


def _block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``TinyViTBlock.forward`` with 4D permutes around the local convolution (same values)."""
    height, width = self.input_resolution
    batch, tokens, channels = x.shape
    residual = x
    if height == self.window_size and width == self.window_size:
        x = self.attn(x)
    else:
        x = x.view(batch, height, width, channels)
        pad_bottom = (self.window_size - height % self.window_size) % self.window_size
        pad_right = (self.window_size - width % self.window_size) % self.window_size
        if pad_bottom or pad_right:
            x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_height, padded_width = height + pad_bottom, width + pad_right
        rows, cols = padded_height // self.window_size, padded_width // self.window_size
        x = x.view(batch, rows, self.window_size, cols, self.window_size, channels).transpose(2, 3)
        x = self.attn(x.reshape(batch * rows * cols, self.window_size * self.window_size, channels))
        x = x.view(batch, rows, cols, self.window_size, self.window_size, channels).transpose(2, 3)
        x = x.reshape(batch, padded_height, padded_width, channels)
        if pad_bottom or pad_right:
            x = x[:, :height, :width].contiguous()
        x = x.view(batch, tokens, channels)
    x = residual + self.drop_path(x)
    x = self.local_conv(x.view(batch, height, width, channels).permute(0, 3, 1, 2))
    x = x.permute(0, 2, 3, 1).reshape(batch, tokens, channels)
    return x + self.drop_path(self.mlp(x))


def _merging_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``PatchMerging.forward`` ending in a 4D permute instead of ``flatten(2).transpose(1, 2)``."""
    if x.ndim == 3:
        height, width = self.input_resolution
        x = x.view(len(x), height, width, -1).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    x = self.conv3(x)
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def permute_around_convolutions(encoder: nn.Module) -> int:
    """Make TinyViT's blocks and patch merging reach their convolutions through 4D permutes, in place.

    Returns:
        How many modules were changed (0 for a ViT encoder).
    """
    count = 0
    for module in encoder.modules():
        if all(hasattr(module, name) for name in ("local_conv", "attn", "mlp", "window_size", "input_resolution")):
            module.forward = types.MethodType(_block_forward, module)  # TinyViTBlock
            count += 1
        elif all(hasattr(module, name) for name in ("conv1", "conv2", "conv3", "act", "input_resolution")):
            module.forward = types.MethodType(_merging_forward, module)  # PatchMerging (MBConv has act1..3)
            count += 1
    return count


def for_openvino(encoder: nn.Module) -> nn.Module:
    """An eval-mode copy of ``encoder`` with :func:`split_qkv` and :func:`permute_around_convolutions`
    applied (a ViT encoder comes back as a plain copy); ``encoder`` itself is untouched."""
    rewritten = copy.deepcopy(encoder).eval()
    split_qkv(rewritten)
    permute_around_convolutions(rewritten)
    return rewritten
