"""The GPU encoder path: a float16, channels-last copy of the image encoder, fused attention.

Attached to a model at load time (``model.half_encoder``) and used by
:meth:`~MedFMSegmentLib.models.PromptableModel.encode_half` for CUDA inputs; ``python -m bench gpu``
and ``python -m bench encoder_gpu`` measure its speed and its Dice against float32. The copy is
rebuilt whenever an encoder weight changes (tensor version counters), so fine-tuning or loading
an adapter never leaves it stale.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING

import torch

from .fast_encoder import fuse_attention

if TYPE_CHECKING:
    from ..models import PromptableModel

__all__ = ["FUSED_ENCODER_ENV", "HalfPrecisionEncoder", "fused_from_environment"]

#: ``MEDFMSEGMENT_FUSED_ENCODER=0`` turns fused window attention off (read once, at load time).
FUSED_ENCODER_ENV = "MEDFMSEGMENT_FUSED_ENCODER"


def fused_from_environment() -> bool:
    """Whether :data:`FUSED_ENCODER_ENV` leaves fused attention on (the default)."""
    return os.environ.get(FUSED_ENCODER_ENV, "1") != "0"


class HalfPrecisionEncoder:
    """Image embeddings from a float16 channels-last copy of a model's encoder, on CUDA.

    Args:
        fused: Rewrite the copy's window attention into one fused attention call (faster on the
            GPU for the same embedding error); BatchNorm folding is not done (slower there).
    """

    def __init__(self, fused: bool = True) -> None:
        self.fused = fused
        self._fingerprint: tuple | None = None
        self._encoder: torch.nn.Module | None = None

    def __call__(self, model: "PromptableModel", images: torch.Tensor) -> torch.Tensor:
        """``(B, C, 64, 64)`` float16 embeddings of ``(B, 3, S, S)`` CUDA images in [0, 1]."""
        fingerprint = tuple((id(p), p._version) for p in model.image_encoder.parameters())
        if self._encoder is None or self._fingerprint != fingerprint:
            half = copy.deepcopy(model.image_encoder).half().eval().to(memory_format=torch.channels_last)
            if self.fused:
                fuse_attention(half)
            for parameter in half.parameters():
                parameter.requires_grad_(False)
            self._fingerprint, self._encoder = fingerprint, half
        x = model.normalize(images).half().contiguous(memory_format=torch.channels_last)
        return self._encoder(x).contiguous()
