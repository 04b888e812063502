"""The ``batch`` command's cohort options: ``--cluster SPEC`` (Dask) and ``--report`` (QC page).

Registered after :mod:`MedFMSegmentLib.batch` (see ``cli._register_optional_commands``): it adds
the two flags to the ``batch`` parser and wraps its handler, so the batch module never imports
this package's Dask code and, without these flags, the command runs exactly as before.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Callable

__all__ = ["register_cli", "report_from_outputs"]


def register_cli(commands) -> None:
    """Add ``--cluster`` and ``--report`` to the ``batch`` subcommand (when it is registered)."""
    parser = commands.choices.get("batch") if hasattr(commands, "choices") else None
    if parser is None:
        return
    group = parser.add_argument_group("cohort (pip install 'medfmsegment[cohort]')")
    group.add_argument("--cluster", metavar="SPEC",
                       help="run on Dask: local:N (N worker processes here), tcp://HOST:PORT (a running "
                            "scheduler) or slurm:CONFIG (dask-jobqueue, a YAML file); outputs are written by the workers")
    group.add_argument("--report", action="store_true",
                       help="also write report.html (thumbnails, volumes, times, flags) and qc.csv")
    parser.set_defaults(handler=_wrap(parser.get_default("handler")))


def _wrap(single_process: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        if args.cluster:
            if getattr(args, "server", None):
                from ..errors import InputError

                raise InputError("--cluster and --server cannot be combined: choose where the cases run")
            return _cmd_cluster_batch(args)
        code = single_process(args)
        if args.report:
            page = report_from_outputs(args.inputs, args.output_dir)
            print(f"QC report in {page}")
        return code

    return handler


def _cmd_cluster_batch(args: argparse.Namespace) -> int:
    from ..batch import settings_from_args
    from .cluster import parse_cluster_spec
    from .distributed import run_batch_on_cluster

    settings = settings_from_args(args)
    spec = parse_cluster_spec(args.cluster)  # a bad spec is one line before anything starts

    def report(done: int, total: int, result) -> None:
        detail = result.error if result.status == "failed" else f"{result.foreground_voxels} voxels"
        again = f" (attempt {result.attempts})" if result.attempts > 1 else ""
        print(f"case {done}/{total} {result.status} {Path(result.output).name} {result.seconds:.1f} s {detail}"
              f"{again} {result.worker}".rstrip(), flush=True)

    results = run_batch_on_cluster(args.inputs, args.output_dir, settings, spec, progress=report, report=args.report)
    failed = sum(r.status == "failed" for r in results)
    print(f"{len(results) - failed} of {len(results)} cases done; summary in {Path(args.output_dir) / 'summary.csv'}"
          + (f"; QC report in {Path(args.output_dir) / 'report.html'}" if args.report else ""))
    return 1 if failed else 0


def report_from_outputs(inputs, output_dir, thresholds=None) -> Path:
    """The QC report of a finished batch, from ``summary.csv`` and the outputs (re-reads each image).

    For the single-process batch; the cluster batch measures each case on its worker instead.
    """
    from ..batch import discover_cases
    from ..errors import InputError
    from .qc_report import CaseQC, measure_output, write_report

    output_dir = Path(output_dir)
    with (output_dir / "summary.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    cases = discover_cases(inputs)
    entries = []
    for case, row in zip(cases, rows):
        entry = CaseQC(case.name)
        if row["status"] != "failed":
            try:
                entry = measure_output(case.read(), None, row["output"], case.name)
            except (InputError, RuntimeError, ValueError, OSError) as exc:
                entry.not_measured = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        entry.input, entry.output, entry.status, entry.seconds = row["input"], row["output"], row["status"], \
            float(row["seconds"] or 0)
        entries.append(entry)
    return write_report(entries, output_dir, thresholds=thresholds)
