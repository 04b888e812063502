"""``medfmsegment demo``: segment a generated test volume end to end on the embedded model.

Writes a synthetic MR-like volume (an ellipsoid "organ" beside a second blob, on an oblique,
anisotropic grid), segments the organ from a 3D box exactly as ``medfmsegment segment`` does, and
reports where the files are and the Dice against the known truth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def make_demo_volume(seed: int = 0):
    """A ``MedicalImage`` with a bright ellipsoid and a distractor blob, plus the ellipsoid mask."""
    from .geometry import VolumeGeometry
    from .io import MedicalImage

    shape = (12, 80, 96)  # (K, J, I)
    grid = np.ogrid[:shape[0], :shape[1], :shape[2]]
    organ = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, (6, 40, 40), (4.5, 18, 22))) <= 1
    blob = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, (6, 40, 80), (3, 8, 8))) <= 1
    rng = np.random.default_rng(seed)
    volume = 60 + 300 * organ + 180 * blob + 12 * rng.standard_normal(shape)
    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = VolumeGeometry((shape[2], shape[1], shape[0]), (0.9, 0.9, 2.5), (-40.0, -30.0, 10.0), direction)
    return MedicalImage(volume.astype(np.float32), geometry, source="demo"), organ


def run_demo(output_dir: Path, device: str = "auto") -> dict:
    import SimpleITK as sitk

    from .api import segment_file
    from .io import mask_to_sitk
    from .prompts import Prompts

    from .files import check_output_folder
    from .io import write_sitk_image

    check_output_folder(output_dir)  # a file or read-only folder: one clear line before any work
    image, organ = make_demo_volume()
    sitk_image = sitk.GetImageFromArray(image.array)
    sitk_image.CopyInformation(mask_to_sitk(organ, image.geometry))
    image_path = output_dir / "demo_image.nii.gz"
    write_sitk_image(sitk_image, image_path)
    k, j, i = np.nonzero(organ)
    box = tuple(int(v) for v in (i.min(), j.min(), k.min(), i.max(), j.max(), k.max()))
    started = time.perf_counter()
    result = segment_file(image_path, output_dir / "demo_segmentation.seg.nrrd", Prompts(box=box), device=device)
    overlap = 2 * (result.mask & organ).sum() / (result.mask.sum() + organ.sum())
    return {"image": str(image_path), "segmentation": str(result.output), "box": list(box),
            "dice_vs_truth": round(float(overlap), 4), "seconds": round(time.perf_counter() - started, 1),
            "device": result.device, "model": "litemedsam (embedded)"}


def register_cli(commands) -> None:
    parser = commands.add_parser("demo", help="segment a generated volume with the embedded model")
    parser.add_argument("-o", "--output-dir", default="medfmsegment-demo", help="where to write (default ./medfmsegment-demo)")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    report = run_demo(Path(args.output_dir), args.device)
    print(json.dumps(report, indent=2))
    print(f"segmentation written to {report['segmentation']} (open it in 3D Slicer over {report['image']})")
    return 0
