"""A from-scratch MONAI U-Net trained on the same few cases as an adapter.

Two uses: the learning-curve baseline ("is adapting LiteMedSAM better than training a small
network from scratch on the same cases in the same time?") and, for volumes, the second
candidate for automatic mode that fine-tuning trains next to the adapter and keeps when held-out
cases show it better (:mod:`.automatic_choice`). A 3D ``monai.networks.nets.UNet`` for volumes
(whole volumes, or random patches around the structure when they are large), a 2D one for
single images (resized to a square side), MONAI transforms for augmentation, ``DiceCELoss``,
trained until a wall-clock budget (or a step count) is spent.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CancelledError, InputError
from ..io import MedicalImage
from ..preprocessing import IntensitySettings, normalize_intensity

__all__ = ["BaselineConfig", "BaselineModel", "SegmentationNet", "train_baseline", "predict_baseline",
           "MAX_PATCH_VOXELS"]

#: Volumes whose padded shape holds more voxels train on random patches of at most this many
#: (a whole-volume batch of a CT would not fit in memory) and predict by sliding window.
MAX_PATCH_VOXELS = 96 ** 3


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


def _multiple(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_to(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    pads = []
    for size, target in zip(reversed(x.shape[1:]), reversed(shape)):
        pads += [0, max(0, target - size)]
    return F.pad(x, pads)


class SegmentationNet(torch.nn.Module):
    """A MONAI U-Net with what prediction needs: input size rules and the patch it trained on.

    Args:
        spatial_dims: 3 for volumes ``(K, J, I)``, 2 for single images (resized to ``image_side``).
        channels: U-Net channels per level (each level halves the size: stride 2).
        image_side: Square side 2D images are resized to.
        patch: 3D only: the ``(K, J, I)`` patch it trained on when volumes were too large to train
            whole; larger inputs are predicted by sliding window. None: whole volumes.
    """

    def __init__(self, spatial_dims: int, channels: tuple = (16, 32, 64, 128), image_side: int = 256,
                 patch: tuple | None = None) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        self.spatial_dims, self.channels, self.image_side = int(spatial_dims), tuple(channels), int(image_side)
        self.patch = tuple(int(p) for p in patch) if patch else None
        self.net = UNet(spatial_dims=self.spatial_dims, in_channels=1, out_channels=1, channels=self.channels,
                        strides=(2,) * (len(self.channels) - 1), num_res_units=2)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def settings(self) -> dict:
        """What rebuilds this network (an adapter's ``automatic_net`` metadata)."""
        return {"kind": "monai_unet", "spatial_dims": self.spatial_dims, "channels": list(self.channels),
                "image_side": self.image_side, "patch": list(self.patch) if self.patch else None}

    @classmethod
    def from_settings(cls, settings: dict) -> "SegmentationNet":
        return cls(settings["spatial_dims"], tuple(settings["channels"]), settings.get("image_side", 256),
                   settings.get("patch"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def prepare(self, array: np.ndarray, intensity: IntensitySettings, modality: str | None) -> torch.Tensor:
        """``(1, *spatial)`` float tensor in [0, 1]: the volume (K, J, I), or the 2D image resized."""
        x = torch.from_numpy(np.ascontiguousarray(normalize_intensity(array, intensity, modality), dtype=np.float32))
        if self.spatial_dims == 2:
            return F.interpolate(x[None], size=(self.image_side,) * 2, mode="bilinear", align_corners=False)[0]
        return x[None]

    @torch.no_grad()
    def logits(self, image: MedicalImage, intensity: IntensitySettings) -> torch.Tensor:
        """Float logits on ``image``'s ``(K, J, I)`` grid (CPU)."""
        x = self.prepare(image.array, intensity, image.modality)
        shape = image.array.shape
        device = next(self.parameters()).device
        if self.spatial_dims == 2:
            out = self(x[None].to(device))[0].float().cpu()
            return F.interpolate(out[None], size=shape[1:], mode="bilinear", align_corners=False)[0, 0][None]
        x = _pad_to(x, tuple(_multiple(max(n, p), self.stride) for n, p in zip(shape, self.patch or shape)))
        # a patch-trained net, or a whole-volume one given a far larger volume than it trained on
        window = self.patch or _patch_for(tuple(x.shape[1:]), self.stride)
        if window is not None and any(n > p for n, p in zip(x.shape[1:], window)):
            from monai.inferers import sliding_window_inference

            out = sliding_window_inference(x[None].to(device), window, 1, self, overlap=0.25, mode="gaussian")
        else:
            out = self(x[None].to(device))
        return out[0, 0, :shape[0], :shape[1], :shape[2]].float().cpu()

    def segment(self, image: MedicalImage, intensity: IntensitySettings) -> np.ndarray:
        """``(K, J, I)`` boolean mask on ``image``'s grid (all components)."""
        return (self.logits(image, intensity) > 0).numpy()


@dataclass
class BaselineModel:
    """A trained baseline network and what prediction needs to know about it."""

    net: SegmentationNet
    spatial_dims: int
    config: BaselineConfig
    steps: int
    seconds: float


def _target(label: MedicalImage, config: BaselineConfig, spatial_dims: int) -> torch.Tensor:
    values = label.array
    mask = (values != 0) if config.label_value is None else (values == config.label_value)
    y = torch.from_numpy(mask.astype(np.float32))
    if spatial_dims == 2:
        y = (F.interpolate(y[None], size=(config.image_side,) * 2, mode="nearest")[0] > 0.5).float()
    return y[None] if spatial_dims == 3 else y


def _patch_for(shape: tuple[int, ...], stride: int) -> tuple[int, ...] | None:
    """The training patch for volumes padded to ``shape``: None when whole volumes fit."""
    if math.prod(shape) <= MAX_PATCH_VOXELS:
        return None
    side = max(stride, int(round(MAX_PATCH_VOXELS ** (1 / 3))) // stride * stride)
    patch = [min(n, side) for n in shape]
    for d in range(3):  # thin volumes: give the room they leave to the other axes
        while math.prod(patch) * (patch[d] + stride) / patch[d] <= MAX_PATCH_VOXELS and patch[d] + stride <= shape[d]:
            patch[d] += stride
    return tuple(patch)


def _augmenter(spatial_dims: int, seed: int, patch: tuple | None):
    from monai.transforms import Compose, RandAffined, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd

    keys = ("image", "label")
    crop = [RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=1, neg=1,
                                   num_samples=1)] if patch else []
    transform = Compose(crop + [
        RandFlipd(keys=keys, prob=0.5, spatial_axis=spatial_dims - 1),
        RandAffined(keys=keys, prob=0.5, rotate_range=(0.26,) if spatial_dims == 2 else (0.0, 0.0, 0.26),
                    scale_range=(0.1,) * spatial_dims, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
    ])
    transform.set_random_state(seed=seed)
    return transform


def _sample(augment, x: torch.Tensor, y: torch.Tensor):
    out = augment({"image": x, "label": y})
    out = out[0] if isinstance(out, list) else out  # a patch crop gives a list of samples
    return torch.as_tensor(out["image"]), torch.as_tensor(out["label"])


def train_baseline(cases: list[tuple[MedicalImage, MedicalImage]], config: BaselineConfig | None = None,
                   progress=None, cancel=None, initial: SegmentationNet | None = None) -> BaselineModel:
    """Train a U-Net on ``cases`` (all 2D images or all volumes) until the budget is spent.

    ``initial``: a network to train further (a continued adapter's) instead of random weights;
    its shape settings are kept. ``progress`` gets ``{"step", "loss", "seconds"}`` after each step.
    """
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
    net = initial if initial is not None else SegmentationNet(spatial_dims, config.channels, config.image_side)
    if net.spatial_dims != spatial_dims:
        raise InputError(f"a {net.spatial_dims}D network cannot train on {spatial_dims}D cases")
    data = [(net.prepare(image.array, config.intensity, image.modality), _target(label, config, spatial_dims))
            for image, label in cases]
    if spatial_dims == 3:  # one padded shape, divisible by the U-Net's total stride
        shape = tuple(_multiple(max(x.shape[1 + d] for x, _ in data), net.stride) for d in range(3))
        if net.patch is None:  # a continued whole-volume net given large volumes trains on patches too
            net.patch = _patch_for(shape, net.stride)
        if net.patch is not None:
            shape = tuple(max(n, p) for n, p in zip(shape, net.patch))
        data = [(_pad_to(x, shape), _pad_to(y, shape)) for x, y in data]
    device = torch.device(config.device)
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(sigmoid=True)
    augment = _augmenter(spatial_dims, config.seed, net.patch if spatial_dims == 3 else None)
    start, step = time.monotonic(), 0
    net.train()
    while step < config.max_steps and (step == 0 or time.monotonic() - start < config.seconds):
        if cancel is not None and cancel.is_set():
            raise CancelledError("baseline training cancelled")
        batch = [_sample(augment, *data[i]) for i in rng.integers(len(data), size=config.batch_size)]
        x = torch.stack([b[0] for b in batch]).to(device)
        y = (torch.stack([b[1] for b in batch]) > 0.5).float().to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        step += 1
        if progress is not None:
            progress({"step": step, "loss": float(loss.detach()), "seconds": time.monotonic() - start})
    net.eval()
    return BaselineModel(net, spatial_dims, config, step, round(time.monotonic() - start, 1))


def predict_baseline(model: BaselineModel, image: MedicalImage, keep_largest: bool = True) -> np.ndarray:
    """The baseline's ``(K, J, I)`` boolean mask on ``image``'s grid."""
    from ..inference.automatic import keep_largest_component

    mask = model.net.segment(image, model.config.intensity)
    return keep_largest_component(mask) if keep_largest and mask.any() else mask
