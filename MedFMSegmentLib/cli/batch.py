"""``medfmsegment batch``: many cases, one model load, ``summary.csv`` (:mod:`MedFMSegmentLib.batch`).

:func:`settings_from_args` turns the flags into :class:`~MedFMSegmentLib.batch.BatchSettings`;
:func:`run` sends them where the work is done: this process, or a Dask cluster (``--cluster``,
:mod:`.cohort`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from typing import TYPE_CHECKING

from . import cohort
from ..errors import InputError
from .options import (EXIT_FAILURE, EXIT_OK, add_axis_option, add_box3d_strategy_option, add_engine_options,
                      add_server_options)

if TYPE_CHECKING:
    from ..batch import BatchSettings

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "settings_from_args"]

HELP = "segment many images (files, folders, DICOM series)"
DESCRIPTION = ("Segment every case automatically with an adapter, or from per-case prompts. Writes one label file per "
               "case and summary.csv.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..batch import OUTPUT_FORMATS, BatchSettings

    defaults = BatchSettings()
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, DICOM folders")
    parser.add_argument("-o", "--output-dir", required=True,
                        help="output folder (created if missing; never an input or inside one)")
    parser.add_argument("--adapter", help="adapter folder trained for automatic segmentation")
    parser.add_argument("--prompts", help="JSON file mapping inputs to prompts or to Slicer .mrk.json files")
    parser.add_argument("--format", default=defaults.output_format, choices=list(OUTPUT_FORMATS),
                        help=f"output format (default {defaults.output_format}; dcm: DICOM SEG, for DICOM inputs)")
    parser.add_argument("--resume", action="store_true",
                        help="skip cases whose output was made from the same input, prompts, model and settings")
    add_axis_option(parser, default=defaults.axis)
    add_box3d_strategy_option(parser, default=defaults.box3d_strategy)
    add_engine_options(parser, default_model=defaults.model_name)
    cohort.add_options(parser)
    add_server_options(parser, "run each case on a running 'medfmsegment serve' at this URL (--adapter: the name "
                               "of one of its adapters; its own device and backend)")


def settings_from_args(args: argparse.Namespace) -> BatchSettings:
    """The :class:`BatchSettings` the flags ask for (the prompts file read and checked)."""
    from ..batch import BatchSettings, load_prompts_file

    return BatchSettings(adapter=args.adapter, model_name=args.model, checkpoint=args.checkpoint,
                         device=args.device, backend=args.backend, precision=args.precision,
                         output_format=args.format, resume=args.resume, axis=args.axis,
                         box3d_strategy=args.box3d_strategy,
                         prompts=load_prompts_file(args.prompts) if args.prompts else {})


def run(args: argparse.Namespace) -> int:
    if args.cluster and args.server:
        raise InputError("--cluster and --server cannot be combined: choose where the cases run")
    settings = settings_from_args(args)
    if args.cluster:
        return cohort.run_on_cluster(args.inputs, args.output_dir, settings, args.cluster, report=args.report)
    code = run_here(args.inputs, args.output_dir, settings, server=args.server, token_file=args.token_file)
    if args.report:
        print(f"QC report in {cohort.report_after_batch(args.inputs, args.output_dir)}")
    return code


def run_here(inputs: list[str], output_dir: str, settings: BatchSettings, server: str | None = None,
             token_file: str | None = None) -> int:
    """The batch from this process (each case's inference on ``server`` when given), one progress
    line (or bar) per case."""
    from ..batch import run_batch
    from ..progress import batch_progress
    from ..service.remote_batch import run_batch_remote

    with batch_progress() as report:
        if server:
            results = run_batch_remote(inputs, output_dir, settings, server=server, token_file=token_file,
                                       progress=report)
        else:
            results = run_batch(inputs, output_dir, settings, progress=report)
    failed = sum(r.status == "failed" for r in results)
    print(f"{len(results) - failed} of {len(results)} cases done; summary in {Path(output_dir) / 'summary.csv'}")
    return EXIT_FAILURE if failed else EXIT_OK
