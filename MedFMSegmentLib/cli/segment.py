"""``medfmsegment segment``: one image from a box and/or clicks (or automatically with an adapter)."""

from __future__ import annotations

import argparse
import time

from .options import (EXIT_OK, add_axis_option, add_box3d_strategy_option, add_engine_options, add_intensity_options,
                      add_server_options, check_finite, intensity_from_args, one_of)

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]

HELP = "segment an image from a box and/or clicks"
DESCRIPTION = ("Segment IMAGE (a file or a DICOM folder). Coordinates are 0-based voxel indices (I = column, J = row, "
               "K = slice; K = 0 in 2D); box corners are inclusive.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..inference.automatic import KEEP_COMPONENTS

    parser.add_argument("image", help="image file (NIfTI, NRRD, MHA, PNG, JPEG) or DICOM series folder")
    parser.add_argument("--series",
                        help="DICOM series instance UID (or its unique ending) in a folder holding several")
    parser.add_argument("-o", "--output", required=True,
                        help="output label file: .nii.gz, .nii, .nrrd, .seg.nrrd, .mha or .png (2D)")
    parser.add_argument("--box", nargs=6, type=float, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                        help="box corners (inclusive); spanning several slices segments in 3D")
    parser.add_argument("--point", nargs=3, type=float, action="append", default=[], metavar=("I", "J", "K"),
                        help="positive click (repeatable)")
    parser.add_argument("--negative", nargs=3, type=float, action="append", default=[], metavar=("I", "J", "K"),
                        help="negative click (repeatable)")
    add_axis_option(parser)
    parser.add_argument("--propagate", action="store_true",
                        help="with a one-slice prompt, propagate through the volume until the structure ends")
    add_box3d_strategy_option(parser)
    parser.add_argument("--adapter", help="adapter folder from 'medfmsegment finetune'")
    parser.add_argument("--keep-components", default=None, choices=list(KEEP_COMPONENTS),
                        help=f"automatic mode post-processing: {one_of(KEEP_COMPONENTS)} connected components "
                             "(default: the adapter's setting)")
    add_engine_options(parser)
    add_intensity_options(parser)
    add_server_options(parser, "segment on a running 'medfmsegment serve' at this URL (--adapter: a name there)")


def run(args: argparse.Namespace) -> int:
    from ..api import segment_file
    from ..progress import slice_progress
    from ..prompts import Prompts

    for flag, values in (("--box", [args.box or []]), ("--point", args.point), ("--negative", args.negative)):
        check_finite(flag, values)
    prompts = Prompts(box=tuple(int(round(v)) for v in args.box) if args.box else None,
                      positives=[tuple(p) for p in args.point], negatives=[tuple(p) for p in args.negative])
    started = time.perf_counter()
    common = dict(model_name=args.model, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device,
                  backend=args.backend, precision=args.precision, axis=args.axis,
                  intensity=intensity_from_args(args), propagate=True if args.propagate else None,
                  keep_components=args.keep_components, box3d_strategy=args.box3d_strategy)
    if args.server:
        from ..service.remote import segment_file_remote  # the same work, on the service

        result = segment_file_remote(args.image, args.output, prompts, server=args.server,
                                     token_file=args.token_file, **common)
    else:
        with slice_progress() as progress:
            result = segment_file(args.image, args.output, prompts, series=args.series, progress=progress, **common)
    print(f"wrote {result.output} ({result.foreground_voxels} voxels segmented, "
          f"{time.perf_counter() - started:.1f} s on {result.device}, backend {result.backend})")
    return EXIT_OK
