"""Intensity normalisation and the slice <-> model-input mapping.

A slice goes to the model as LiteMedSAM and MedSAM were trained: intensities clipped and scaled
to [0, 1], the slice resized so its longer physical side fills the model input (keeping the
physical aspect ratio, so anisotropic pixels are not distorted), padded at the bottom/right.
:class:`SliceTransform` maps boxes and clicks into that frame and logits back to the slice's own
pixel grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_CT_WINDOW", "INTENSITY_MODES", "IntensitySettings", "SliceTransform", "apply_intensity_window", "intensity_window",
           "normalize_intensity"]

#: Default CT window (level, width) in HU: soft tissue.
DEFAULT_CT_WINDOW = (40.0, 400.0)
#: :attr:`IntensitySettings.mode` values.
INTENSITY_MODES = ("auto", "percentile", "ct", "none")


@dataclass(frozen=True)
class IntensitySettings:
    """How raw voxel values become [0, 1].

    Attributes:
        mode: ``"auto"`` (CT window for CT, 8-bit data as it is, percentiles otherwise),
            ``"percentile"``, ``"ct"``
            or ``"none"`` (values already in [0, 1] or 0..255).
        window: CT ``(level, width)`` in HU, used by ``"ct"`` and by ``"auto"`` on CT images.
        percentiles: Lower and upper clipping percentiles of the non-zero voxels (MR, US, ...).
    """

    mode: str = "auto"
    window: tuple[float, float] = DEFAULT_CT_WINDOW
    percentiles: tuple[float, float] = (0.5, 99.5)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "window": list(self.window), "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, data: dict) -> "IntensitySettings":
        default = cls()
        return cls(data.get("mode", default.mode), tuple(data.get("window", default.window)),
                   tuple(data.get("percentiles", default.percentiles)))


def intensity_window(volume: np.ndarray, settings: IntensitySettings = IntensitySettings(),
                     modality: str | None = None) -> tuple[float, float]:
    """The raw values ``(low, high)`` that map to 0 and 1 for this volume and these settings."""
    mode = settings.mode
    if mode == "auto":
        if (modality or "").upper() == "CT":
            mode = "ct"
        elif volume.min() >= 0 and volume.max() <= 255 and np.array_equal(volume, np.round(volume)):
            mode = "none"  # 8-bit data (PNG/JPEG, 8-bit MR) keeps its full range: measured better on HC18
        else:
            mode = "percentile"
    if mode == "ct":
        level, width = settings.window
        low, high = level - width / 2.0, level + width / 2.0
    elif mode == "percentile":
        foreground = volume[volume > volume.min()] if np.any(volume > volume.min()) else volume.ravel()
        if foreground.size > 2_000_000:  # percentiles of a large CT do not need every voxel
            foreground = foreground[:: foreground.size // 2_000_000 + 1]
        low, high = np.percentile(foreground, settings.percentiles)
    elif mode == "none":
        low, high = (0.0, 255.0) if volume.max() > 1.0 else (0.0, 1.0)
    else:
        raise ValueError(f"unknown intensity mode {settings.mode!r}")
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def normalize_intensity(volume: np.ndarray, settings: IntensitySettings = IntensitySettings(),
                        modality: str | None = None) -> np.ndarray:
    """Clip and scale a whole volume to float32 [0, 1] (computed once per volume, not per slice)."""
    volume = np.asarray(volume, dtype=np.float32)
    low, high = intensity_window(volume, settings, modality)
    return apply_intensity_window(volume, low, high)


def apply_intensity_window(volume: np.ndarray | torch.Tensor, low: float, high: float) -> np.ndarray | torch.Tensor:
    """``clip((volume - low) / (high - low), 0, 1)`` as float32, for a NumPy array or a tensor on any
    device (a GPU session normalises its volume where it lives)."""
    if isinstance(volume, torch.Tensor):
        return torch.clamp((volume.float() - low) / (high - low), 0.0, 1.0)
    # In place on one new array: a 300-slice CT is 300 MB of float32, every extra pass counts.
    scaled = np.subtract(volume, low, dtype=np.float32)
    scaled /= high - low
    return np.clip(scaled, 0.0, 1.0, out=scaled)


@dataclass(frozen=True)
class SliceTransform:
    """Maps one slice (``rows x cols`` pixels of size ``pixel_size``) into a square model input.

    Attributes:
        rows, cols: Slice size in pixels.
        new_rows, new_cols: Size of the resized slice inside the ``target`` x ``target`` input.
        target: Model input side.
    """

    rows: int
    cols: int
    new_rows: int
    new_cols: int
    target: int

    @classmethod
    def create(cls, rows: int, cols: int, target: int,
               pixel_size: tuple[float, float] = (1.0, 1.0)) -> "SliceTransform":
        """Fit a slice whose pixels measure ``pixel_size`` = (row spacing, column spacing) mm."""
        height, width = rows * pixel_size[0], cols * pixel_size[1]
        scale = target / max(height, width)
        new_rows = min(target, max(1, int(round(height * scale))))
        new_cols = min(target, max(1, int(round(width * scale))))
        return cls(rows, cols, new_rows, new_cols, target)

    @property
    def scale_rows(self) -> float:
        return self.new_rows / self.rows

    @property
    def scale_cols(self) -> float:
        return self.new_cols / self.cols

    def image_to_input(self, image: np.ndarray) -> torch.Tensor:
        """A 2D slice in [0, 1] -> ``(3, target, target)`` tensor, min-max rescaled and padded.

        The per-slice min-max stretch follows LiteMedSAM's and MedSAM's inference code.
        """
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        return self.images_to_input(tensor)[0]

    def images_to_input(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, rows, cols)`` float slices on any device -> ``(N, 3, target, target)`` on that device.

        Batched so that a GPU resizes a whole batch at once instead of the CPU doing it slice by slice.
        """
        downscale = self.new_rows < self.rows or self.new_cols < self.cols
        resized = F.interpolate(images[:, None].float(), size=(self.new_rows, self.new_cols), mode="bilinear",
                                align_corners=False, antialias=downscale)
        low = resized.amin(dim=(-2, -1), keepdim=True)
        high = resized.amax(dim=(-2, -1), keepdim=True)
        resized = (resized - low) / torch.clamp(high - low, min=1e-8)
        padded = F.pad(resized, (0, self.target - self.new_cols, 0, self.target - self.new_rows))
        return padded.expand(-1, 3, -1, -1)

    def box_to_input(self, box: tuple[float, float, float, float]) -> np.ndarray:
        """Box ``(col0, row0, col1, row1)`` with inclusive pixel corners -> model-input ``(x0, y0, x1, y1)``."""
        c0, r0, c1, r1 = box
        return np.array([c0 * self.scale_cols, r0 * self.scale_rows,
                         (c1 + 1) * self.scale_cols - 1, (r1 + 1) * self.scale_rows - 1], dtype=np.float32)

    def points_to_input(self, points: np.ndarray) -> np.ndarray:
        """Pixel centres ``(N, 2)`` as ``(col, row)`` -> model-input ``(x, y)``."""
        points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        return np.stack([(points[:, 0] + 0.5) * self.scale_cols - 0.5,
                         (points[:, 1] + 0.5) * self.scale_rows - 0.5], axis=1)

    def logits_to_slice(self, logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits ``(N, 1, h, w)`` covering the padded input -> ``(N, rows, cols)`` logits."""
        upsampled = F.interpolate(logits.float(), size=(self.target, self.target), mode="bilinear",
                                  align_corners=False)
        cropped = upsampled[..., : self.new_rows, : self.new_cols]
        return F.interpolate(cropped, size=(self.rows, self.cols), mode="bilinear", align_corners=False)[:, 0]

    def mask_to_input(self, mask: np.ndarray) -> torch.Tensor:
        """A slice mask ``(rows, cols)`` -> ``(target, target)`` float mask in the input frame (nearest)."""
        tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        resized = F.interpolate(tensor, size=(self.new_rows, self.new_cols), mode="nearest")
        return F.pad(resized, (0, self.target - self.new_cols, 0, self.target - self.new_rows))[0, 0]
