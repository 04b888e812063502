"""Where a model is loaded: its weights (:mod:`.models`) and its inference backend (:mod:`.backends`).

The environment (``$MEDFMSEGMENT_BACKEND``, ``$MEDFMSEGMENT_PRECISION``,
``$MEDFMSEGMENT_FUSED_ENCODER``) is read here, once per load, never on a per-call path.
"""

from __future__ import annotations

import os

import torch

from .backends import accelerate, check_backend, default_backend
from .backends.cuda_half import HalfPrecisionEncoder, fused_from_environment
from .models import DEFAULT_MODEL, PromptableModel, build_model

__all__ = ["load_model", "with_backend"]


def with_backend(model: PromptableModel, backend: str | None = None, precision: str | None = None,
                 parts: tuple[str, ...] = ("encoder", "decoder")) -> PromptableModel:
    """Give a plain PyTorch model its inference paths, in place: the CUDA half-precision encoder
    and the backend ``backend`` names (see :func:`~MedFMSegmentLib.backends.accelerate`)."""
    model.half_encoder = HalfPrecisionEncoder(fused=fused_from_environment())
    return accelerate(model, default_backend() if backend is None else backend, precision, parts)


def load_model(name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
               device: str | torch.device = "auto", backend: str | None = None,
               precision: str | None = None) -> PromptableModel:
    """Build a registered model with its weights, in eval mode, on a device, with its backend.

    Args:
        name: A key of :data:`~MedFMSegmentLib.models.MODEL_SPECS`.
        checkpoint: Weights file; required for SAM/MedSAM, ignored for the embedded LiteMedSAM
            unless given (then it replaces the embedded weights, e.g. a fine-tuned full model).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (or a ``torch.device``).
        backend: One of :data:`~MedFMSegmentLib.backends.BACKENDS`: ``auto`` (OpenVINO on a CPU
            for LiteMedSAM when installed, else PyTorch), ``torch`` or ``openvino``. None means
            ``$MEDFMSEGMENT_BACKEND``, else ``auto``. Falls back to PyTorch with a logged warning
            when the faster backend cannot be used.
        precision: One of :data:`~MedFMSegmentLib.backends.PRECISIONS` (see
            :func:`~MedFMSegmentLib.backends.resolve_precision`). None means
            ``$MEDFMSEGMENT_PRECISION``, else ``auto``.

    Raises:
        InputError: unknown name, backend, precision, missing checkpoint, weights that do not fit.
    """
    backend = check_backend(backend, precision)  # an unknown name fails before the weights are read
    return with_backend(build_model(name, checkpoint, device), backend, precision)
