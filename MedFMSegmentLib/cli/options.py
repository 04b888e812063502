"""Options several subcommands share, and the exit codes.

Every choice and default comes from the library module that owns the concept: models and devices
(:mod:`~MedFMSegmentLib.models`), backends and precisions (:mod:`~MedFMSegmentLib.backends`),
slicing axes and 3D-box strategies (:mod:`~MedFMSegmentLib.inference`), intensity modes
(:mod:`~MedFMSegmentLib.preprocessing`); nothing here lists them again. Those modules import
torch, so they are imported when an option is added, not with this module.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Iterable, Sequence

from ..errors import InputError

if TYPE_CHECKING:
    from ..preprocessing import IntensitySettings

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "add_axis_option", "add_backend_options",
           "add_box3d_strategy_option", "add_device_option", "add_engine_options", "add_intensity_options",
           "add_server_options", "check_finite", "intensity_from_args", "one_of"]

#: 0 done; 1 some cases of a batch failed; 2 bad input (one line on stderr); 130 interrupted.
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def one_of(values: Sequence[str]) -> str:
    """``"a, b or c"``: a registry's names for help text."""
    values = list(values)
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``: free text, so ``cuda:N`` works; checked where the model loads."""
    from ..models import DEFAULT_DEVICE, DEVICES

    parser.add_argument("--device", default=DEFAULT_DEVICE,
                        help=f"{', '.join(DEVICES)} or cuda:N (default {DEFAULT_DEVICE}: cuda, then mps, then cpu)")


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--precision``: the inference engine (see :mod:`MedFMSegmentLib.backends`)."""
    from ..backends import BACKENDS, PRECISIONS

    parser.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help="inference backend: auto (OpenVINO on a CPU when installed, else PyTorch; "
                             "default, or $MEDFMSEGMENT_BACKEND), torch or openvino")
    parser.add_argument("--precision", default=None, choices=list(PRECISIONS),
                        help="OpenVINO's precision: auto (bf16 where the CPU computes it natively, else f32; "
                             "default, or $MEDFMSEGMENT_PRECISION), f32, bf16, or int8 (the encoder quantized "
                             "with NNCF, quantized once per machine; faster, slightly less accurate)")


def add_engine_options(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """``--model`` (a registered model; default: the library's), ``--checkpoint``, ``--device``,
    ``--backend``, ``--precision``."""
    from ..models import DEFAULT_MODEL, MODEL_SPECS

    default_model = DEFAULT_MODEL if default_model is None else default_model
    embedded = "" if MODEL_SPECS[default_model].needs_checkpoint else ", embedded"
    parser.add_argument("--model", default=default_model, choices=list(MODEL_SPECS),
                        help=f"model (default {default_model}{embedded})")
    parser.add_argument("--checkpoint", help="weights file for SAM/MedSAM models")
    add_device_option(parser)
    add_backend_options(parser)


def add_axis_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    from ..inference import AXES
    from ..inference.settings import DEFAULT_AXIS

    default = DEFAULT_AXIS if default is None else default
    parser.add_argument("--axis", default=default, choices=list(AXES),
                        help=f"slicing orientation; {default} (default): the slice a flat box lies on, else across "
                             "a 3D box's shortest side, else axial")


def add_box3d_strategy_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--box3d-strategy``: how a 3D box is segmented (default and choices: ``PredictorSettings``)."""
    from ..inference import BOX3D_STRATEGIES, PredictorSettings

    default = PredictorSettings().box3d_strategy if default is None else default
    limit = PredictorSettings().consensus_max_slices
    parser.add_argument("--box3d-strategy", default=default, choices=list(BOX3D_STRATEGIES),
                        help="a 3D box: propagate slice by slice across its shortest side, or combine three "
                             "axes (consensus: more accurate on the benchmark hippocampi, ~4x the encoder work; "
                             f"with --axis auto only); auto: consensus for a box whose three sides sum to at most "
                             f"{limit} voxels, else propagate (default {default})")


def add_intensity_options(parser: argparse.ArgumentParser) -> None:
    from ..preprocessing import DEFAULT_CT_WINDOW, INTENSITY_MODES, IntensitySettings

    level, width = DEFAULT_CT_WINDOW
    parser.add_argument("--intensity", default=IntensitySettings().mode, choices=list(INTENSITY_MODES),
                        help="intensity scaling: auto = CT window for CT, 8-bit images as they are, "
                             "percentile clipping otherwise")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"),
                        help=f"CT window in HU (implies --intensity ct); default {level:g} {width:g}")


def intensity_from_args(args: argparse.Namespace) -> IntensitySettings:
    from ..preprocessing import DEFAULT_CT_WINDOW, IntensitySettings

    if args.window:
        return IntensitySettings(mode="ct", window=tuple(args.window))
    return IntensitySettings(mode=args.intensity, window=DEFAULT_CT_WINDOW)


def add_server_options(parser: argparse.ArgumentParser, server_help: str) -> None:
    """``--server URL`` and ``--token-file``: do the work on a running ``medfmsegment serve``."""
    parser.add_argument("--server", help=server_help)
    parser.add_argument("--token-file", help="the service's token file (default: $MEDFMSEGMENT_TOKEN)")


def check_finite(flag: str, groups: Iterable[Sequence[float]]) -> None:
    """Refuse NaN and infinite coordinates given to ``flag``, in one line."""
    groups = list(groups)
    if not all(math.isfinite(v) for group in groups for v in group):
        raise InputError(f"{flag} needs finite numbers, got {' '.join(str(v) for group in groups for v in group)}")
