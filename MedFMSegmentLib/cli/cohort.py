"""The ``batch`` command's cohort options: ``--cluster SPEC`` (Dask) and ``--report`` (QC page).

Dask, distributed and highdicom (``pip install 'medfmsegment[cohort]'``) are imported only when
these options are used; a missing one is one line and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .options import EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from ..batch import BatchSettings

__all__ = ["add_options", "report_after_batch", "run_on_cluster"]


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cohort (pip install 'medfmsegment[cohort]')")
    group.add_argument("--cluster", metavar="SPEC",
                       help="run on Dask: local:N (N worker processes here), tcp://HOST:PORT (a running "
                            "scheduler) or slurm:CONFIG (dask-jobqueue, a YAML file); outputs are written by the workers")
    group.add_argument("--report", action="store_true",
                       help="also write report.html (thumbnails, volumes, times, flags) and qc.csv")


def run_on_cluster(inputs: list[str], output_dir: str, settings: BatchSettings, spec: str, report: bool) -> int:
    """The batch on the Dask cluster ``spec`` names, one line per finished case."""
    from ..cohort.cluster import parse_cluster_spec
    from ..cohort.distributed import run_batch_on_cluster

    cluster = parse_cluster_spec(spec)  # a bad spec is one line before anything starts

    def progress(done: int, total: int, result) -> None:
        detail = result.error if result.status == "failed" else f"{result.foreground_voxels} voxels"
        again = f" (attempt {result.attempts})" if result.attempts > 1 else ""
        print(f"case {done}/{total} {result.status} {Path(result.output).name} {result.seconds:.1f} s {detail}"
              f"{again} {result.worker}".rstrip(), flush=True)

    results = run_batch_on_cluster(inputs, output_dir, settings, cluster, progress=progress, report=report)
    failed = sum(r.status == "failed" for r in results)
    print(f"{len(results) - failed} of {len(results)} cases done; summary in {Path(output_dir) / 'summary.csv'}"
          + (f"; QC report in {Path(output_dir) / 'report.html'}" if report else ""))
    return EXIT_FAILURE if failed else EXIT_OK


def report_after_batch(inputs: list[str], output_dir: str) -> Path:
    """Write the QC report of a finished single-process batch; returns the page."""
    from ..cohort.qc_report import report_from_outputs

    return report_from_outputs(inputs, output_dir)
