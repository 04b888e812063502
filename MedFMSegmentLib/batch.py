"""Batch segmentation: many cases, one model load, a summary, resume, no half-written outputs.

Inputs are image files, folders of image files and DICOM folders (each series is one case).
Cases are segmented automatically with an adapter trained for it, or from prompts given per
case in a JSON file (voxel indices) or as Slicer markups files (``.mrk.json``, physical
coordinates). The next case is read in a background thread while the current one computes.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import io as _io
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import __version__
from .errors import CancelledError, InputError
from .files import (atomic_write_text, check_output_folder, refuse_overlap, safe_name, sweep_leftovers,
                    unique_names)
from .geometry import VolumeGeometry, roi_corners
from .integrity import stray_dicom_files
from .io import IMAGE_2D_EXTENSIONS, MedicalImage, find_dicom_series, read_dicom_series, read_image
from .prompts import Prompts
from .records import file_identity, folder_identity, output_checksum, record_matches, record_path, write_record

__all__ = ["OUTPUT_FORMATS", "SUMMARY_FIELDS", "BatchSettings", "Case", "CaseResult", "check_batch", "discover_cases",
           "load_prompts_file", "output_path_for", "prompts_from_markups", "run_batch", "segment_case",
           "segments_elsewhere", "write_summary"]

OUTPUT_FORMATS = ("nii.gz", "nrrd", "seg.nrrd", "dcm")  # dcm: DICOM SEG (cohort/dicom_seg.py)
_VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd") + IMAGE_2D_EXTENSIONS
SUMMARY_FIELDS = ("input", "output", "status", "seconds", "foreground_voxels", "error")


@dataclass
class Case:
    """One thing to segment: a file or one DICOM series."""

    name: str
    source: str
    dicom_files: list[str] | None = None
    problem: str = ""  # why it cannot be read, found while discovering it

    @property
    def files(self) -> list[str]:
        """The files this case reads."""
        return list(self.dicom_files) if self.dicom_files is not None else [self.source]

    def read(self) -> MedicalImage:
        if self.problem:
            raise InputError(self.problem)
        if self.dicom_files is not None:
            return read_dicom_series(self.dicom_files, source=self.source)
        return read_image(self.source)


@dataclass
class CaseResult:
    """One row of ``summary.csv``."""

    input: str
    output: str
    status: str  # "ok", "skipped" (resume) or "failed"
    seconds: float = 0.0
    foreground_voxels: int = 0
    error: str = ""

    def row(self) -> dict:
        return {"input": self.input, "output": self.output, "status": self.status,
                "seconds": f"{self.seconds:.2f}", "foreground_voxels": self.foreground_voxels, "error": self.error}


@dataclass
class BatchSettings:
    """Options of a batch run (the command's flags)."""

    adapter: str | None = None
    model_name: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "auto"
    backend: str | None = None
    precision: str | None = None
    output_format: str = "nii.gz"
    resume: bool = False
    axis: str = "auto"
    box3d_strategy: str = "auto"
    prompts: dict[str, Prompts | list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- discovering cases
def discover_cases(inputs: Iterable[str | os.PathLike]) -> list[Case]:
    """Expand files and folders into cases with unique, file-system-safe names.

    Names are decided once for the whole list (see :func:`~MedFMSegmentLib.files.unique_names`),
    so two inputs never share an output, whatever their order.
    """
    cases: list[Case] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            cases.append(Case(_stem(path), str(path)))
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            images = [p for p in files if p.name.lower().endswith(_VOLUME_EXTENSIONS)]
            cases.extend(Case(_stem(p), str(p)) for p in images)
            series = find_dicom_series(path)
            stray = stray_dicom_files(path, [f for _, dicom_files in series for f in dicom_files]) if series else []
            problem = (f"{len(stray)} DICOM file(s) in {path} cannot be read as part of a series (damaged?): "
                       f"{', '.join(Path(f).name for f in stray[:3])}") if stray else ""
            for uid, dicom_files in series:
                label = path.name if len(series) == 1 else f"{path.name}_{uid[-8:]}"
                cases.append(Case(safe_name(label), str(path), dicom_files, problem))
            if not images and not series:
                # Kept as a case so the summary says why nothing was segmented from it.
                cases.append(Case(safe_name(path.name), str(path), problem=f"no image or DICOM series in {path}"))
        else:
            cases.append(Case(safe_name(path.name, "missing"), str(path)))
    for case, name in zip(cases, unique_names(c.name for c in cases)):
        case.name = name
    return cases


def _stem(path: Path) -> str:
    name = path.name
    for ext in sorted(_VOLUME_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return safe_name(name)


# ---------------------------------------------------------------------------- prompts files
def load_prompts_file(path: str | os.PathLike) -> dict[str, Prompts | list[str] | InputError]:
    """Read ``--prompts``: a JSON object mapping an input (path, file name or case name) to prompts.

    Each value is either a prompts object ``{"box": [i0, j0, k0, i1, j1, k1], "points": [[i, j, k]],
    "negatives": [...]}`` in voxel indices, or the path (or list of paths) of Slicer markups files
    (``.mrk.json``), converted per case with that case's geometry. Relative markups paths are
    relative to the prompts file. A malformed entry is kept as its :class:`InputError`, so only
    its own case fails; a file that is not a JSON object fails at once.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read prompts file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"prompts file {path} must hold a JSON object mapping inputs to prompts")
    result: dict[str, Prompts | list[str] | InputError] = {}
    for key, value in data.items():
        try:
            result[key] = _prompt_entry(value, path)
        except InputError as exc:
            result[key] = InputError(f"prompts for {key!r}: {exc}")
    return result


def _prompt_entry(value, path: Path) -> Prompts | list[str]:
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        files = [value] if isinstance(value, str) else value
        return [str((path.parent / f).resolve()) if not Path(f).is_absolute() else f for f in files]
    if isinstance(value, dict):
        _check_finite_numbers(value)
        return Prompts.from_dict(value)
    raise InputError("must be an object or markups file path(s)")


def _check_finite_numbers(value) -> None:
    """Refuse NaN, infinite (JSON ``1e400``) and absurdly large coordinates before any rounding."""
    if isinstance(value, dict):
        for item in value.values():
            _check_finite_numbers(item)
    elif isinstance(value, list):
        for item in value:
            _check_finite_numbers(item)
    elif isinstance(value, float) and not (math.isfinite(value) and abs(value) < 1e12):
        raise InputError(f"coordinate {value} is not a finite voxel index")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        raise InputError(f"coordinate {value} is not a voxel index of any image")


def prompts_from_markups(files: list[str], geometry: VolumeGeometry) -> Prompts:
    """Slicer ``.mrk.json`` markups -> voxel prompts: an ROI gives the box, control points give clicks.

    Control points of a point list whose name contains "neg" (or whose control point label does)
    become negative clicks. Coordinates are RAS or LPS as the file's ``coordinateSystem`` says.

    Raises:
        InputError: an unreadable file or a malformed markup (no ROI size, ``markups`` not a
            list, non-finite coordinates...).
    """
    prompts = Prompts()
    for file in files:
        try:
            document = json.loads(Path(file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read markups file {file}: {exc}") from None
        try:
            _add_markups(document, geometry, prompts)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise InputError(f"malformed markups file {file}: {detail}") from None
    return prompts


def _add_markups(document: dict, geometry: VolumeGeometry, prompts: Prompts) -> None:
    markups = document["markups"] if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise ValueError("'markups' must be a list")
    for markup in markups:
        to_index = geometry.lps_to_index if markup.get("coordinateSystem", "LPS") == "LPS" else geometry.ras_to_index
        kind = markup.get("type", "")
        if kind == "ROI":
            center = markup.get("center") or markup["controlPoints"][0]["position"]
            corners = roi_corners(_finite(center), _finite(markup["size"]),
                                  _finite(markup.get("orientation", np.eye(3).ravel())).reshape(3, 3))
            ijk = to_index(corners)
            lower = np.clip(np.floor(ijk.min(axis=0) + 0.5), 0, np.array(geometry.size) - 1)
            upper = np.clip(np.floor(ijk.max(axis=0) + 0.5), 0, np.array(geometry.size) - 1)
            prompts.box = tuple(int(v) for v in (*lower, *upper))
        elif kind == "Fiducial":
            negative_list = "neg" in markup.get("name", "").lower()
            for point in markup.get("controlPoints", []):
                ijk = tuple(float(v) for v in np.round(to_index(_finite(point["position"]).reshape(3))))
                negative = negative_list or "neg" in point.get("label", "").lower()
                (prompts.negatives if negative else prompts.positives).append(ijk)


def _finite(values) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if not np.isfinite(array).all() or np.abs(array).max(initial=0) > 1e12:
        raise ValueError(f"non-finite or huge coordinates {array.ravel().tolist()[:6]}")
    return array


def _prompt_entry_for(case: Case, table: dict) -> Prompts | list[str] | InputError | None:
    for key in (case.source, str(Path(case.source).resolve()), Path(case.source).name, case.name):
        if key in table:
            return table[key]
    return None


def _prompts_for(case: Case, table: dict, geometry: VolumeGeometry) -> Prompts | None:
    value = _prompt_entry_for(case, table)
    if isinstance(value, InputError):
        raise value
    return prompts_from_markups(value, geometry) if isinstance(value, list) else value


def _prompt_identity(value) -> object:
    if isinstance(value, Prompts):
        return value.to_dict()
    if isinstance(value, list):
        return [{"path": os.path.realpath(f), "content": output_checksum(f)} for f in value]
    return None if value is None else str(value)


# ---------------------------------------------------------------------------- running
def output_path_for(case: Case, output_dir: Path, output_format: str) -> Path:
    """The output file of a case."""
    return output_dir / f"{case.name}.{output_format}"


def segments_elsewhere(model) -> bool:
    """Whether ``model`` segments elsewhere (``service.remote_batch.RemoteSegmenter``): it has
    ``identity()`` (for the records) and ``segment_image(image, prompts, **options)``, and
    ``settings.adapter`` names its adapter, not a local folder."""
    return callable(getattr(model, "identity", None)) and callable(getattr(model, "segment_image", None))


def _provenance(case: Case, settings: BatchSettings, model) -> dict:
    """What the output of ``case`` depends on (see :mod:`MedFMSegmentLib.records`)."""
    return {"library": __version__, "input": file_identity(case.files),
            "prompts": _prompt_identity(_prompt_entry_for(case, settings.prompts)),
            "model": model.identity() if segments_elsewhere(model) else {
                "name": model.spec.name, "weights_sha256": getattr(model, "weights_sha256", ""),
                "adapter": folder_identity(settings.adapter), "backend": settings.backend,
                "precision": settings.precision},
            "settings": {"axis": settings.axis, "box3d_strategy": settings.box3d_strategy,
                         "format": settings.output_format}}


def _check_outputs(cases: list[Case], output_dir: Path, settings: BatchSettings, inputs: list,
                   local_adapter: bool = True) -> list[Path]:
    """Output paths for every case, after refusing any that would land on or inside an input."""
    outputs = [output_path_for(case, output_dir, settings.output_format) for case in cases]
    sources = [*inputs, *(f for case in cases for f in case.files)]
    sources += [f for value in settings.prompts.values() if isinstance(value, list) for f in value]
    if settings.adapter is not None and local_adapter:
        sources.append(settings.adapter)
    refuse_overlap([output_dir, output_dir / "summary.csv", *outputs], sources)
    return outputs


def run_batch(inputs: Iterable[str | os.PathLike], output_dir: str | os.PathLike, settings: BatchSettings,
              progress: Callable[[int, int, CaseResult], None] | None = None,
              cancel: threading.Event | None = None, model=None, adapter_info=None) -> list[CaseResult]:
    """Segment every case, writing one label file per case and ``summary.csv`` in ``output_dir``.

    Everything checkable is checked before the model loads: the format, the output folder (usable,
    not an input, not inside one), that prompts or an adapter are given. A case that fails (an
    unreadable image, a malformed prompt) is recorded and the run goes on. Every output gets a
    resume record (:mod:`MedFMSegmentLib.records`); ``summary.csv`` is rewritten atomically after
    every case. Leftover temporaries of a killed run are swept first; nothing else in the folder
    is touched.

    Args:
        inputs: Files and folders.
        output_dir: Created when missing.
        settings: Adapter, prompts, format, device, resume, slicing axis, 3D-box strategy.
        progress: Called as ``progress(done, total, result)`` after each case.
        cancel: Set it to stop after the current case (raises :class:`CancelledError`).
        model: An already loaded model to reuse (the Slicer module passes its own), or a segmenter
            elsewhere (:func:`segments_elsewhere`), with its adapter's ``adapter_info``.

    Returns:
        One :class:`CaseResult` per case, in input order.
    """
    from .api import load_segmenter

    cases, outputs, output_dir, predictor_settings = check_batch(inputs, output_dir, settings,
                                                                 not segments_elsewhere(model))
    if model is None:
        model, adapter_info = load_segmenter(settings.model_name, settings.checkpoint, settings.adapter,
                                             settings.device, settings.backend, settings.precision)
    results: list[CaseResult] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_read_case, cases[0])
        for index, (case, output) in enumerate(zip(cases, outputs)):
            if cancel is not None and cancel.is_set():
                raise CancelledError("batch cancelled")
            image, read_error = pending.result()
            if index + 1 < len(cases):
                pending = reader.submit(_read_case, cases[index + 1])  # overlaps reading with compute
            result = segment_case(case, image, read_error, output, settings, model, adapter_info,
                                  predictor_settings, cancel=cancel)
            results.append(result)
            write_summary(results, output_dir / "summary.csv")
            if progress is not None:
                progress(index + 1, len(cases), result)
    return results


def check_batch(inputs: Iterable[str | os.PathLike], output_dir: str | os.PathLike,
                settings: BatchSettings, local_adapter: bool = True) -> tuple[list[Case], list[Path], Path, object]:
    """Everything checkable before a model loads; then the output folder is made and swept
    (``local_adapter=False``: ``settings.adapter`` is a service's adapter name, no file here).

    Returns:
        ``(cases, outputs, output_dir, predictor_settings)``.
    """
    from .inference import PredictorSettings

    predictor_settings = PredictorSettings(box3d_strategy=settings.box3d_strategy)  # checked before any work
    if settings.output_format not in OUTPUT_FORMATS:
        raise InputError(f"unknown format {settings.output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    inputs = [str(p) for p in inputs]
    output_dir = Path(output_dir)
    if settings.adapter is None and not settings.prompts:
        raise InputError("batch work needs --adapter (automatic segmentation) or --prompts FILE")
    cases = discover_cases(inputs)
    if not cases:
        raise InputError("no input cases given")
    if settings.output_format == "dcm":
        from .cohort.dicom_seg import check_dicom_inputs

        check_dicom_inputs([(case.source, case.dicom_files) for case in cases])
    outputs = _check_outputs(cases, output_dir, settings, inputs, local_adapter)
    check_output_folder(output_dir)
    sweep_leftovers(output_dir)
    return cases, outputs, output_dir, predictor_settings


def segment_case(case: Case, image: MedicalImage | None, read_error: Exception | None, output: Path,
                 settings: BatchSettings, model, adapter_info, predictor_settings, cancel=None,
                 on_mask: Callable[[MedicalImage, np.ndarray], None] | None = None) -> CaseResult:
    """One case of a batch: resume check, prompts, segmentation, atomic write, record; never raises on bad input.

    ``image``/``read_error`` are what :meth:`Case.read` gave. ``on_mask(image, mask)`` is called
    after the output is written (the cluster batch's QC report uses it).
    """
    started = time.perf_counter()
    result = CaseResult(case.source if case.dicom_files is None else f"{case.source} (DICOM series)",
                        str(output), "ok")
    try:
        provenance = _provenance(case, settings, model)
        if settings.resume and record_matches(output, provenance):
            result.status = "skipped"
        else:
            if read_error is not None:
                raise read_error
            mask = _segment_case(case, image, output, provenance, settings, model, adapter_info,
                                 predictor_settings, cancel)
            result.foreground_voxels = int(mask.sum())
            if on_mask is not None:
                on_mask(image, mask)
    except (CancelledError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - one case's failure must not stop the others
        message = str(exc).splitlines()[0] if str(exc) else ""
        if not isinstance(exc, InputError):
            message = f"{type(exc).__name__}: {message}"
        result.status, result.error = "failed", message
    result.seconds = time.perf_counter() - started
    return result


def _segment_case(case: Case, image: MedicalImage, output: Path, provenance: dict, settings: BatchSettings,
                  model, adapter_info, predictor_settings, cancel) -> np.ndarray:
    """Segment one case and write its label map between a pending and a final resume record.

    An existing file without a record is not this tool's output: it is never replaced.
    """
    from .api import segment_image
    from .io import write_label

    if output.exists() and not record_path(output).exists():
        raise InputError(f"{output.name} exists and was not written by a batch run (no record beside it): "
                         "move it away or choose another output folder")
    prompts = _prompts_for(case, settings.prompts, image.geometry) or Prompts()
    if prompts.is_empty and (adapter_info is None or not adapter_info.automatic):
        raise InputError("no prompts for this case and no automatic adapter")
    prompts.validate(image.geometry)
    segment = model.segment_image if segments_elsewhere(model) else functools.partial(segment_image, model)
    mask = segment(image, prompts, axis=settings.axis, adapter_info=adapter_info, settings=predictor_settings,
                   cancel=cancel)
    name = adapter_info.label_name if adapter_info is not None else "Segment_1"
    write_record(output, provenance, pending=True)
    if settings.output_format == "dcm":
        from .cohort.dicom_seg import write_dicom_seg

        write_dicom_seg(mask, image.geometry, case.dicom_files, output, segment_name=name,
                        adapter_metadata=adapter_info.metadata if adapter_info is not None else None)
    else:
        write_label(mask, image.geometry, output, is_2d=image.is_2d, segment_name=name)
    write_record(output, provenance)
    return mask


def _read_case(case: Case) -> tuple[MedicalImage | None, Exception | None]:
    try:
        return case.read(), None
    except Exception as exc:  # noqa: BLE001 - reported as this case's failure
        return None, exc


def write_summary(results: list[CaseResult], path: Path) -> None:
    """Write ``summary.csv`` atomically (through a unique temporary: two runs may share a folder)."""
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for result in results:
        writer.writerow(result.row())
    atomic_write_text(path, buffer.getvalue())
