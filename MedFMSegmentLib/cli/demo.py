"""``medfmsegment demo``: a generated CT-like volume segmented end to end (:mod:`MedFMSegmentLib.demo`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import EXIT_OK, add_device_option

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]

HELP = "segment a generated volume with the embedded model"
DESCRIPTION = ("Generate a CT-like volume, segment its organ from a 3D box with the embedded LiteMedSAM (default "
               "settings), and write the image, the segmentation, a PNG of the result and its Dice.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..demo import DEFAULT_OUTPUT_DIR

    parser.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"where to write (default ./{DEFAULT_OUTPUT_DIR})")
    add_device_option(parser)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from ..progress import slice_progress

    with slice_progress("segmenting the demo volume") as progress:
        report = run_demo(Path(args.output_dir), args.device, progress=progress)
    print(json.dumps(report, indent=2))
    print(f"segmentation written to {report['segmentation']} (open it in 3D Slicer over {report['image']}); "
          f"picture: {report['picture']}")
    return EXIT_OK
