"""The image encoder cut in two: a frozen head whose output is cached, and a trainable tail.

Fine-tuning with LoRA in the last encoder stage only (``FinetuneConfig.encoder="partial"``) runs
the head once per training slice and back-propagates through the tail alone, so a step costs a
fraction of one through the whole encoder (``python -m bench perf --finetune-only`` measures it;
figures in ``docs/benchmarks.md``). TinyViT (LiteMedSAM) is cut before ``layers[first]``,
segment-anything's ViT (SAM, MedSAM and the tiny test model) before ``blocks[first]``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

__all__ = ["check_first_stage", "encode_head", "encode_tail", "stage_prefix"]


def _stages(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    if hasattr(encoder, "layers") and hasattr(encoder, "patch_embed"):  # TinyViT
        return "layers", encoder.layers
    if hasattr(encoder, "blocks") and hasattr(encoder, "patch_embed"):  # segment-anything ViT
        return "blocks", encoder.blocks
    raise InputError(f"cannot split image encoder {type(encoder).__name__}: "
                     "partial fine-tuning knows TinyViT and segment-anything's ViT")


def stage_prefix(encoder: nn.Module) -> str:
    """The module-name prefix of the encoder's stages: ``layers`` (TinyViT) or ``blocks`` (ViT)."""
    return _stages(encoder)[0]


def check_first_stage(encoder: nn.Module, first: int) -> None:
    """Raise :class:`InputError` unless ``first`` indexes a stage of ``encoder``."""
    name, stages = _stages(encoder)
    if not 0 <= first < len(stages):
        raise InputError(f"the first trained encoder stage must be between 0 and {len(stages) - 1} "
                         f"({len(stages)} {name}), got {first}")


def encode_head(encoder: nn.Module, images: torch.Tensor, first: int) -> torch.Tensor:
    """What the encoder's stage ``first`` receives, for ``(B, 3, S, S)`` normalised images.

    TinyViT gives ``(B, tokens, C)``, the ViT ``(B, H, W, C)``.
    """
    name, stages = _stages(encoder)
    x = encoder.patch_embed(images)
    if name == "blocks" and encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for stage in stages[:first]:
        x = stage(x)
    return x


def encode_tail(encoder: nn.Module, features: torch.Tensor, first: int) -> torch.Tensor:
    """The image embedding ``(B, C, 64, 64)`` from :func:`encode_head`'s output: ``encoder(x)``
    equals ``encode_tail(encoder, encode_head(encoder, x, first), first)``."""
    name, stages = _stages(encoder)
    x = features
    for stage in stages[first:]:
        x = stage(x)
    if name == "layers":
        batch, tokens, channels = x.shape
        side = int(round(tokens ** 0.5))
        x = x.view(batch, side, side, channels)
    return encoder.neck(x.permute(0, 3, 1, 2))
