"""INT8 post-training quantization of the image encoder's OpenVINO graph (NNCF), calibrated on
generated images.

Why generated images: the quantizer needs sample inputs to choose each activation's INT8 range,
and the library ships no patient data. :func:`calibration_images` draws smooth textures,
ellipses of random size, contrast and orientation, speckle-like noise and zero borders (what a
padded ultrasound frame or MR slice looks like to the encoder), deterministic for a seed.

INT8 runs the encoder faster than bfloat16 on CPUs with VNNI but moves single images' Dice more
(``python -m bench perf --precision int8`` measures both), with the patch embedding kept in float.
INT8 is therefore an explicit choice (``precision="int8"``), never what ``auto`` picks.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["CALIBRATION_IMAGES", "CALIBRATION_SEED", "CALIBRATION_VERSION", "calibration_image",
           "calibration_images", "nncf_available", "nncf_version", "quantize_encoder", "stem_convolutions"]

# Bump when the calibration set or the quantization settings change: cached graphs are keyed by it.
CALIBRATION_VERSION = 2
CALIBRATION_IMAGES = 64
CALIBRATION_SEED = 0


def nncf_available() -> bool:
    """Whether NNCF (``pip install nncf``), which INT8 quantization needs, is installed."""
    return importlib.util.find_spec("nncf") is not None


def nncf_version() -> str | None:
    """NNCF's installed version, read from its package metadata (``info`` must not import it)."""
    if not nncf_available():
        return None
    try:
        return importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def calibration_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """One ``(1, 3, size, size)`` float32 image in [0, 1] (three equal channels, as slices are fed)."""
    image = gaussian_filter(rng.random((size, size)), sigma=rng.uniform(1, 8)) * rng.uniform(0.2, 1.0)
    rows, cols = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(1, 6))):  # structures: ellipses brighter or darker than around them
        centre_row, centre_col = rng.uniform(0, size, 2)
        radius_row, radius_col = rng.uniform(size / 32, size / 3, 2)
        angle = rng.uniform(0, np.pi)
        dy, dx = rows - centre_row, cols - centre_col
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius_col
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radius_row
        image = np.where(u ** 2 + v ** 2 <= 1, image * rng.uniform(0, 0.5) + rng.uniform(0, 1), image)
    if rng.random() < 0.7:
        image = image + rng.normal(0, rng.uniform(0, 0.08), image.shape)
    image = gaussian_filter(image, rng.uniform(0, 1.5))
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    if rng.random() < 0.3:  # the zero padding right of (or below) a non-square slice
        image[:, int(size * rng.uniform(0.6, 1.0)):] = 0
    return np.repeat(image[None, None].astype(np.float32), 3, axis=1)


def calibration_images(size: int, count: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """``count`` generated ``(1, 3, size, size)`` images, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    return [calibration_image(rng, size) for _ in range(count)]


def stem_convolutions(model: Any, count: int) -> list[str]:
    """Names of the first ``count`` convolutions of an OpenVINO graph, in execution order: the
    patch embedding, which reads the image itself."""
    names = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return names[:count]


def quantize_encoder(model: Any, size: int, float_stem: int = 2) -> Any:
    """INT8 copy of an OpenVINO encoder graph that takes ``(1, 3, size, size)`` images in [0, 1].

    Uses NNCF's transformer preset (SmoothQuant, float softmax and normalisation), which kept the
    LiteMedSAM embedding closer to float32 than the default preset. The first ``float_stem``
    convolutions (TinyViT's patch embedding has two, a ViT's one) stay in floating point.
    Quantized, they cost Dice on the hardest images for little speed.

    Raises:
        ImportError: NNCF is not installed.
    """
    import contextlib
    import logging
    import sys

    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)
    images = calibration_images(size)
    ignored = nncf.IgnoredScope(names=stem_convolutions(model, float_stem)) if float_stem else None
    # NNCF's progress bars print to stdout; stdout belongs to the caller (batch prints JSON there).
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(model, nncf.Dataset(images), subset_size=len(images),
                             model_type=nncf.ModelType.TRANSFORMER, ignored_scope=ignored)
