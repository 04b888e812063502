"""``medfmsegment evaluate``: Dice and HD95 of a prediction against a label, as one JSON line."""

from __future__ import annotations

import argparse
import json

from .options import EXIT_OK

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]

HELP = "Dice and HD95 of a prediction against a label"
DESCRIPTION = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prediction", required=True, help="predicted label file")
    parser.add_argument("--label", required=True, help="reference label file on the same grid")
    parser.add_argument("--label-value", type=int, default=None,
                        help="compare this label value only (default: every non-zero voxel)")


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_files

    print(json.dumps(evaluate_files(args.prediction, args.label, args.label_value), allow_nan=False), flush=True)
    return EXIT_OK
