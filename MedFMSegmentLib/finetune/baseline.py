"""A from-scratch MONAI baseline: a small U-Net trained on the same few cases as an adapter.

It answers "is adapting LiteMedSAM better than training a small network from scratch on the
same cases in the same time?": a 3D ``monai.networks.nets.UNet`` for volumes, a 2D one for
single images (resized to a square side), MONAI transforms for augmentation, ``DiceCELoss``,
trained until a wall-clock budget (or a step count) is spent. Prediction keeps the largest
connected component, as automatic mode does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CancelledError, InputError
from ..io import MedicalImage
from ..preprocessing import IntensitySettings, normalize_intensity

__all__ = ["BaselineConfig", "BaselineModel", "train_baseline", "predict_baseline"]


@dataclass
class BaselineConfig:
    """Training settings; ``seconds`` is the wall-clock budget (embedding-free: all of it trains)."""

    seconds: float = 600.0
    max_steps: int = 100_000
    lr: float = 1e-3
    batch_size: int = 2
    channels: tuple = (16, 32, 64, 128)
    image_side: int = 256  # 2D images are resized to this square side
    label_value: int | None = None
    intensity: IntensitySettings = field(default_factory=IntensitySettings)
    seed: int = 0
    device: str = "cpu"


@dataclass
class BaselineModel:
    """A trained baseline network and what prediction needs to know about it."""

    net: torch.nn.Module
    spatial_dims: int
    config: BaselineConfig
    steps: int
    seconds: float


def _network(spatial_dims: int, config: BaselineConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, channels=tuple(config.channels),
                strides=(2,) * (len(config.channels) - 1), num_res_units=2)


def _multiple(n: int, m: int) -> int:
    return -(-n // m) * m


def _prepare(image: MedicalImage, config: BaselineConfig, spatial_dims: int) -> torch.Tensor:
    """``(1, *spatial)`` float tensor in [0, 1]: the volume (K, J, I), or the 2D image resized."""
    volume = normalize_intensity(image.array, config.intensity, image.modality).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(volume))
    if spatial_dims == 2:
        x = F.interpolate(x[None], size=(config.image_side,) * 2, mode="bilinear", align_corners=False)[0]
    return x[None] if spatial_dims == 3 else x


def _target(label: MedicalImage, config: BaselineConfig, spatial_dims: int) -> torch.Tensor:
    values = label.array
    mask = (values != 0) if config.label_value is None else (values == config.label_value)
    y = torch.from_numpy(mask.astype(np.float32))
    if spatial_dims == 2:
        y = (F.interpolate(y[None], size=(config.image_side,) * 2, mode="nearest")[0] > 0.5).float()
    return y[None] if spatial_dims == 3 else y


def _pad_to(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    pads = []
    for size, target in zip(reversed(x.shape[1:]), reversed(shape)):
        pads += [0, target - size]
    return F.pad(x, pads)


def _augmenter(spatial_dims: int, seed: int):
    from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd

    keys = ("image", "label")
    transform = Compose([
        RandFlipd(keys=keys, prob=0.5, spatial_axis=spatial_dims - 1),
        RandAffined(keys=keys, prob=0.5, rotate_range=(0.26,) if spatial_dims == 2 else (0.0, 0.0, 0.26),
                    scale_range=(0.1,) * spatial_dims, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
    ])
    transform.set_random_state(seed=seed)
    return transform


def train_baseline(cases: list[tuple[MedicalImage, MedicalImage]], config: BaselineConfig | None = None,
                   progress=None, cancel=None) -> BaselineModel:
    """Train a U-Net from random weights on ``cases`` (all 2D images or all volumes)."""
    from monai.losses import DiceCELoss

    config = config or BaselineConfig()
    if not cases:
        raise InputError("the baseline needs at least one image with its label")
    if config.seconds <= 0 or config.max_steps < 1:
        raise InputError("the baseline needs a positive time budget and at least one step")
    kinds = {image.is_2d or image.geometry.size[2] == 1 for image, _ in cases}
    if len(kinds) != 1:
        raise InputError("the baseline trains on 2D images or on volumes, not both at once")
    spatial_dims = 2 if kinds.pop() else 3
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    data = [(_prepare(image, config, spatial_dims), _target(label, config, spatial_dims)) for image, label in cases]
    if spatial_dims == 3:  # one padded shape, divisible by the U-Net's total stride
        stride = 2 ** (len(config.channels) - 1)
        shape = tuple(_multiple(max(x.shape[1 + d] for x, _ in data), stride) for d in range(3))
        data = [(_pad_to(x, shape), _pad_to(y, shape)) for x, y in data]
    device = torch.device(config.device)
    net = _network(spatial_dims, config).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(sigmoid=True)
    augment = _augmenter(spatial_dims, config.seed)
    start, step = time.monotonic(), 0
    net.train()
    while step < config.max_steps and (step == 0 or time.monotonic() - start < config.seconds):
        if cancel is not None and cancel.is_set():
            raise CancelledError("baseline training cancelled")
        batch = [augment({"image": data[i][0], "label": data[i][1]})
                 for i in rng.integers(len(data), size=config.batch_size)]
        x = torch.stack([torch.as_tensor(b["image"]) for b in batch]).to(device)
        y = (torch.stack([torch.as_tensor(b["label"]) for b in batch]) > 0.5).float().to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        step += 1
        if progress is not None:
            progress({"step": step, "loss": float(loss.detach()), "seconds": time.monotonic() - start})
    net.eval()
    return BaselineModel(net, spatial_dims, config, step, round(time.monotonic() - start, 1))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)


@torch.no_grad()
def predict_baseline(model: BaselineModel, image: MedicalImage, keep_largest: bool = True) -> np.ndarray:
    """The baseline's ``(K, J, I)`` boolean mask on ``image``'s grid."""
    config = model.config
    x = _prepare(image, config, model.spatial_dims)
    shape = image.array.shape
    if model.spatial_dims == 3:
        stride = 2 ** (len(config.channels) - 1)
        x = _pad_to(x, tuple(_multiple(n, stride) for n in shape))
    device = next(model.net.parameters()).device
    logits = model.net(x[None].to(device))[0].float().cpu()
    if model.spatial_dims == 3:
        mask = (logits[0, :shape[0], :shape[1], :shape[2]] > 0).numpy()
    else:
        logits = F.interpolate(logits[None], size=shape[1:], mode="bilinear", align_corners=False)[0]
        mask = (logits > 0).numpy()  # (1, J, I)
    return _largest_component(mask) if keep_largest and mask.any() else mask
