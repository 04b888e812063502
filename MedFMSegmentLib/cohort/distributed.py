"""The batch on a Dask cluster: one task per case, the model loaded once per worker.

Each task runs the single-process batch's own per-case function
(:func:`MedFMSegmentLib.batch.segment_case`: resume check, prompts, segmentation, atomic write)
on a worker, so outputs, ``--resume`` and per-case errors are exactly those of ``run_batch``.
The client submits the largest cases first, keeps no more tasks in flight than the cluster has
task threads (so a worker holds only the case it computes), writes ``summary.csv`` atomically as
each result arrives and resubmits, once, a case whose worker died.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterable

from ..batch import Case, CaseResult, BatchSettings, check_batch, segment_case, write_summary
from ..errors import InputError
from .cluster import TORCH_THREADS_VARIABLE, open_cluster
from .qc_report import CaseQC, QCThresholds, measure_output, write_report

__all__ = ["ClusterCaseResult", "run_batch_on_cluster", "case_size", "preload", "segment_on_worker",
           "worker_torch_threads"]

_MODELS: dict[tuple, tuple] = {}  # per worker process: (model, adapter_info) by load settings
_MODELS_LOCK = threading.Lock()


@dataclasses.dataclass
class ClusterCaseResult(CaseResult):
    """A :class:`CaseResult` with how many times the case was started and the worker that finished it."""

    attempts: int = 1
    worker: str = ""


def case_size(case: Case) -> int:
    """Voxels of a case from its file headers (no pixel data read); 0 when unknown."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(case.dicom_files[0] if case.dicom_files else case.source)
        reader.ReadImageInformation()
        size = list(reader.GetSize()) + [1]
        slices = len(case.dicom_files) if case.dicom_files else size[2]
        return int(size[0] * size[1] * slices)
    except (RuntimeError, IndexError, OSError):
        return 0


def worker_torch_threads() -> int:
    """Torch intra-op threads for this worker: ``$MEDFMSEGMENT_TORCH_THREADS``, else its cores / task threads.

    Dask's nanny starts workers with ``OMP_NUM_THREADS=1``; a CPU worker would then encode with
    one core. ``local:N`` sets the variable to the machine's cores // N.
    """
    from distributed import get_worker

    if os.environ.get(TORCH_THREADS_VARIABLE, "").isdigit():
        return max(1, int(os.environ[TORCH_THREADS_VARIABLE]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        return max(1, cores // max(1, get_worker().state.nthreads))
    except ValueError:  # not in a worker
        return cores


def _worker_model(settings: BatchSettings):
    key = (settings.model_name, settings.checkpoint, settings.adapter, settings.device, settings.backend,
           settings.precision)
    with _MODELS_LOCK:
        if key not in _MODELS:
            import torch

            from ..api import load_segmenter

            torch.set_num_threads(worker_torch_threads())
            _MODELS[key] = load_segmenter(*key)
        return _MODELS[key]


def preload(client, settings: BatchSettings) -> dict:
    """Load the model (and adapter) on every worker of ``client`` now; returns {worker: (device, threads)}.

    Without it each worker loads the model in its first case (outside the case's own time).
    """
    def load() -> tuple[str, int]:
        import torch

        return str(_worker_model(settings)[0].device), torch.get_num_threads()

    return client.run(load)


def segment_on_worker(case: Case, output: str, settings: BatchSettings, qc: bool = False) -> tuple[CaseResult, CaseQC | None]:
    """The task: one case through :func:`~MedFMSegmentLib.batch.segment_case` with this worker's model.

    Returns the case's result and, with ``qc``, its QC figures (measured from the mask just
    written, or from the existing output of a case skipped by ``--resume``).
    """
    from ..inference import PredictorSettings

    model, adapter_info = _worker_model(settings)
    try:
        image, read_error = case.read(), None
    except (InputError, RuntimeError, ValueError, OSError) as exc:
        image, read_error = None, exc
    measured: list[CaseQC] = []
    on_mask = (lambda img, mask: measured.append(measure_output(img, mask, output, case.name))) if qc else None
    result = segment_case(case, image, read_error, Path(output), settings, model, adapter_info,
                          PredictorSettings(box3d_strategy=settings.box3d_strategy), on_mask=on_mask)
    if qc and result.status == "skipped":
        measured.append(measure_output(image, None, result.output, case.name))
    return result, (measured[0] if measured else None)


def run_batch_on_cluster(inputs: Iterable[str | os.PathLike], output_dir: str | os.PathLike, settings: BatchSettings,
                         cluster, progress: Callable[[int, int, CaseResult], None] | None = None,
                         report: bool = False, thresholds: QCThresholds | None = None,
                         retries: int = 1, on_submit: Callable[[Case, str], None] | None = None,
                         ) -> list[ClusterCaseResult]:
    """:func:`MedFMSegmentLib.batch.run_batch` on a Dask cluster.

    Args:
        inputs, output_dir, settings: As for ``run_batch`` (checked here, before any worker starts).
        cluster: ``"local:N"``, ``"tcp://HOST:PORT"``, ``"slurm:CONFIG"`` or a ``distributed.Client``.
        progress: ``progress(done, total, result)`` after each case, in completion order.
        report: Also write the QC report (``report.html``, ``qc.csv``) when the batch ends.
        thresholds: The report's flags.
        retries: How many times a case whose worker died is resubmitted before it is reported failed.
        on_submit: ``on_submit(case, task_key)`` as each task is submitted.

    Returns:
        One :class:`ClusterCaseResult` per case, in input order.
    """
    cases, outputs, output_dir, _ = check_batch(inputs, output_dir, settings)
    if settings.adapter is not None:
        from ..finetune.adapters import read_metadata

        read_metadata(settings.adapter)  # a missing adapter is one clear error here, not one per case
    order = sorted(range(len(cases)), key=lambda i: -case_size(cases[i]))  # large series first (stable)
    results: dict[int, ClusterCaseResult] = {}
    measured: dict[int, CaseQC] = {}
    with open_cluster(cluster) as client:
        from distributed import KilledWorker, as_completed

        token, attempts, index_of = uuid.uuid4().hex[:8], [0] * len(cases), {}
        running = as_completed()

        def fill() -> None:
            capacity = max(1, sum(client.nthreads().values()))
            while order and running.count() < capacity:
                i = order.pop(0)
                attempts[i] += 1
                key = f"medfmsegment-case-{token}-{i}-{attempts[i]}"
                future = client.submit(segment_on_worker, cases[i], str(outputs[i]), settings, report,
                                       key=key, pure=False)
                index_of[key] = i
                running.add(future)
                if on_submit is not None:
                    on_submit(cases[i], key)

        fill()
        for future in running:
            i = index_of[future.key]
            worker = ""
            try:
                result, qc = future.result()
                worker = _worker_of(client, future)
            except KilledWorker:
                if attempts[i] <= retries:
                    order.insert(0, i)  # again, before anything else
                    fill()
                    continue
                result, qc = _lost(cases[i], outputs[i], f"its worker died {attempts[i]} times"), None
            except Exception as exc:  # noqa: BLE001 - a task's unexpected error fails its case, not the batch
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                result, qc = _lost(cases[i], outputs[i], message), None
            future.release()
            results[i] = ClusterCaseResult(**dataclasses.asdict(result), attempts=attempts[i], worker=worker)
            if qc is not None:
                measured[i] = qc
            write_summary([results[j] for j in sorted(results)], output_dir / "summary.csv")
            if progress is not None:
                progress(len(results), len(cases), results[i])
            fill()
    ordered = [results[i] for i in range(len(cases))]
    if report:
        write_report([_qc_row(case, result, measured.get(i)) for i, (case, result) in enumerate(zip(cases, ordered))],
                     output_dir, thresholds=thresholds)
    return ordered


def _worker_of(client, future) -> str:
    who = client.who_has([future]).get(future.key, ())
    return who[0] if who else ""


def _lost(case: Case, output: Path, error: str) -> CaseResult:
    label = case.source if case.dicom_files is None else f"{case.source} (DICOM series)"
    return CaseResult(label, str(output), "failed", error=error)


def _qc_row(case: Case, result: CaseResult, qc: CaseQC | None) -> CaseQC:
    row = qc or CaseQC(case.name)
    row.case, row.input, row.output, row.status, row.seconds = case.name, result.input, result.output, \
        result.status, result.seconds
    return row
