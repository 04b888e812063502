"""Shared fixtures: the real LiteMedSAM model, the shared data folder, synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from MedFMSegmentLib.metrics import dice  # noqa: F401 - the tests' one Dice, imported from here

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("MEDFMSEGMENT_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` (or $MEDFMSEGMENT_DATA); tests that need it skip when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data folder {DATA_DIR} is absent")
    return DATA_DIR


@pytest.fixture(scope="session")
def litemedsam():
    """The real embedded LiteMedSAM on the CPU, loaded once for the whole run."""
    import torch

    from MedFMSegmentLib.loading import load_model

    torch.manual_seed(0)
    return load_model("litemedsam", device="cpu")


def oblique_geometry(size=(20, 24, 16), spacing=(0.7, 0.9, 2.5), left_handed=True):
    """An oblique, anisotropic (optionally left-handed) grid with a non-zero origin."""
    from MedFMSegmentLib.geometry import VolumeGeometry

    angle = np.deg2rad(25.0)
    rot_z = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.deg2rad(10.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    direction = rot_z @ rot_x
    if left_handed:
        direction = direction @ np.diag([1.0, 1.0, -1.0])
    return VolumeGeometry(size, spacing, (-12.5, 30.25, 7.0), direction)


def ellipsoid_mask(shape_kji, center_kji, radii_kji) -> np.ndarray:
    """Boolean ellipsoid on a ``(K, J, I)`` grid."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape_kji)]
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center_kji, radii_kji))
    return dist <= 1.0




def write_dicom_series(image, folder, shuffle_names=False, modality="MR", series_uid="1.2.826.0.1.3680043.2.1125.1.2",
                       prefix="IM"):
    """Write a SimpleITK volume as a DICOM series (one file per slice), names optionally shuffled."""
    import random

    import SimpleITK as sitk

    folder.mkdir(exist_ok=True)
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (direction[0], direction[3], direction[6],
                                             direction[1], direction[4], direction[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    names = list(range(image.GetDepth()))
    if shuffle_names:
        random.Random(3).shuffle(names)
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", modality), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", series_uid), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(map(str, position))), ("0020|0013", str(k + 1)),
                           ("0008|0018", f"{series_uid}.3.{k + 1}")):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{names[k]:04d}.dcm"))
        writer.Execute(plane)
