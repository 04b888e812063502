"""``medfmsegment demo``: segment a generated volume end to end on the embedded model, in seconds.

Writes a synthetic CT-like volume (a large ellipsoid "organ" with a smaller bright blob beside it,
on an oblique grid with thick slices), segments the organ from its 3D box exactly as
``medfmsegment segment`` does (``segment_file``, default settings: ``--axis auto``,
``--box3d-strategy auto``), then writes the files, a PNG of the middle slice with the result's
contour, and the Dice against the known truth. The organ spans few thick slices and a large
in-plane area, as an abdominal organ does in a clinical CT: the default takes slice-by-slice
propagation across the box's shortest side, so only those slices pass through the image encoder.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_OUTPUT_DIR", "make_demo_volume", "write_overlay_png", "run_demo"]

#: Where ``medfmsegment demo`` writes unless told (relative to the working folder).
DEFAULT_OUTPUT_DIR = "medfmsegment-demo"


def make_demo_volume(seed: int = 0):
    """A ``MedicalImage`` (K, J, I) = (7, 120, 128), 0.9 x 0.9 x 2.5 mm, rotated 20 degrees in plane,
    with a bright ellipsoid organ and a distractor blob inside the organ's box; plus the organ's
    (K, J, I) bool mask."""
    from .geometry import VolumeGeometry, voxel_order
    from .io import MedicalImage

    shape = (7, 120, 128)  # (K, J, I)
    grid = np.ogrid[:shape[0], :shape[1], :shape[2]]
    organ = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, (3, 60, 58), (2.8, 48, 54))) <= 1
    blob = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, (3, 100, 104), (2.5, 7, 7))) <= 1
    rng = np.random.default_rng(seed)
    volume = 60 + 300 * organ + 180 * (blob & ~organ) + 12 * rng.standard_normal(shape)
    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = VolumeGeometry(voxel_order(shape), (0.9, 0.9, 2.5), (-40.0, -30.0, 10.0), direction)
    return MedicalImage(volume.astype(np.float32), geometry, source="demo"), organ


def write_overlay_png(plane: np.ndarray, mask: np.ndarray, path: Path, scale: int = 3) -> Path:
    """Write a (J, I) image plane as a grey PNG with the (J, I) bool ``mask``'s contour in red,
    enlarged ``scale`` times (nearest neighbour)."""
    import SimpleITK as sitk
    from scipy.ndimage import binary_erosion

    from .io import write_sitk_image

    lo, hi = np.percentile(plane, (0.5, 99.5))
    grey = (np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    big_mask = np.kron(mask.astype(np.uint8), np.ones((scale, scale), np.uint8)).astype(bool)
    rgb = np.kron(rgb, np.ones((scale, scale, 1), np.uint8))
    contour = big_mask & ~binary_erosion(big_mask, iterations=2)
    rgb[contour] = (255, 40, 40)
    return write_sitk_image(sitk.GetImageFromArray(rgb, isVector=True), path, compress=False)


def run_demo(output_dir: Path, device: str = "auto", progress=None) -> dict:
    """Generate, segment and write the demo case into ``output_dir``; returns what was written.

    ``progress(done, planned)`` is called as slices finish (see :mod:`MedFMSegmentLib.progress`).
    """
    from .api import segment_file
    from .files import check_output_folder
    from .io import write_image
    from .metrics import dice
    from .prompts import Prompts

    check_output_folder(output_dir)  # a file or read-only folder: one clear line before any work
    image, organ = make_demo_volume()
    image_path = write_image(image, output_dir / "demo_image.nii.gz")
    k, j, i = np.nonzero(organ)
    box = tuple(int(v) for v in (i.min(), j.min(), k.min(), i.max(), j.max(), k.max()))
    started = time.perf_counter()
    result = segment_file(image_path, output_dir / "demo_segmentation.seg.nrrd", Prompts(box=box), device=device,
                          progress=progress)
    seconds = time.perf_counter() - started
    middle = (box[2] + box[5]) // 2
    png = write_overlay_png(image.array[middle], result.mask[middle], output_dir / "demo_segmentation.png")
    return {"image": str(image_path), "segmentation": str(result.output), "picture": str(png), "box": list(box),
            "dice_vs_truth": round(dice(result.mask, organ), 4), "seconds": round(seconds, 1),
            "device": result.device, "backend": result.backend, "model": "litemedsam (embedded)"}
