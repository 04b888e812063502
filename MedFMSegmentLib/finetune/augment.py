"""Training-time randomness for fine-tuning: image augmentation and jittered box prompts."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["augment_slice", "jittered_box"]


def augment_slice(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """Light MONAI augmentation: flips, 90-degree rotations, small rotations, intensity."""
    from monai.transforms import Compose, RandAdjustContrastd, RandFlipd, RandRotated, RandScaleIntensityd

    transform = Compose([
        RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=1),
        RandRotated(keys=("image", "mask"), range_x=0.26, prob=0.5, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
    ])
    transform.set_random_state(seed=int(rng.integers(2**31)))
    data = transform({"image": image[None].astype(np.float32), "mask": mask[None].astype(np.float32)})
    img = np.clip(np.asarray(data["image"])[0], 0, 1)
    return img, np.asarray(data["mask"])[0] > 0.5


def jittered_box(mask_input: torch.Tensor, rng: np.random.Generator, jitter: float) -> torch.Tensor:
    """The mask's box ``(1, 4)`` as (x0, y0, x1, y1) in pixels, each side moved by up to ``jitter``
    of the box's size (plus 2 pixels), never shrinking it past a quarter of its size."""
    rows = torch.nonzero(mask_input.any(dim=1)).flatten()
    cols = torch.nonzero(mask_input.any(dim=0)).flatten()
    x0, x1, y0, y1 = float(cols[0]), float(cols[-1]), float(rows[0]), float(rows[-1])
    w, h = x1 - x0 + 1, y1 - y0 + 1
    size = mask_input.shape[0]
    dx = rng.uniform(-jitter, jitter, 4) * np.array([w, h, w, h]) + rng.uniform(-2, 2, 4)
    box = np.array([x0, y0, x1, y1]) + dx
    box[:2] = np.minimum(box[:2], [x0 + w / 4, y0 + h / 4])
    box[2:] = np.maximum(box[2:], [x1 - w / 4, y1 - h / 4])
    return torch.tensor(np.clip(box, 0, size - 1), dtype=torch.float32)[None]
