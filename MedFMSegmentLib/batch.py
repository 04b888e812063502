"""Batch segmentation: many cases, one model load, a summary, resume, no half-written outputs.

Inputs are image files, folders of image files and DICOM folders (each series is one case).
Cases are segmented automatically with an adapter trained for it, or from prompts given per
case in a JSON file (voxel indices) or as Slicer markups files (``.mrk.json``, physical
coordinates). The next case is read in a background thread while the current one computes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io as _io
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import CancelledError, InputError
from .geometry import VolumeGeometry
from .io import IMAGE_2D_EXTENSIONS, MedicalImage, find_dicom_series, read_dicom_series, read_image, read_label
from .prompts import Prompts

OUTPUT_FORMATS = ("nii.gz", "nrrd", "seg.nrrd")
_VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd") + IMAGE_2D_EXTENSIONS
SUMMARY_FIELDS = ("input", "output", "status", "seconds", "foreground_voxels", "error")


@dataclass
class Case:
    """One thing to segment: a file or one DICOM series."""

    name: str
    source: str
    dicom_files: list[str] | None = None

    def read(self) -> MedicalImage:
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
    """Expand files and folders into cases with unique, file-system-safe names."""
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
            for uid, dicom_files in series:
                label = path.name if len(series) == 1 else f"{path.name}_{uid[-8:]}"
                cases.append(Case(_safe(label), str(path), dicom_files))
            if not images and not series:
                # Kept as a case so the summary says why nothing was segmented from it.
                cases.append(Case(_safe(path.name), str(path)))
        else:
            cases.append(Case(_safe(path.name) or "missing", str(path)))
    seen: dict[str, int] = {}
    for case in cases:
        count = seen.get(case.name, 0)
        seen[case.name] = count + 1
        if count:
            case.name = f"{case.name}_{count + 1}"
    return cases


def _stem(path: Path) -> str:
    name = path.name
    for ext in sorted(_VOLUME_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return _safe(name)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


# ---------------------------------------------------------------------------- prompts files
def load_prompts_file(path: str | os.PathLike) -> dict[str, Prompts | list[str]]:
    """Read ``--prompts``: a JSON object mapping an input (path, file name or case name) to prompts.

    Each value is either a prompts object ``{"box": [i0, j0, k0, i1, j1, k1], "points": [[i, j, k]],
    "negatives": [...]}`` in voxel indices, or the path (or list of paths) of Slicer markups files
    (``.mrk.json``), converted per case with that case's geometry. Relative markups paths are
    relative to the prompts file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read prompts file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"prompts file {path} must hold a JSON object mapping inputs to prompts")
    result: dict[str, Prompts | list[str]] = {}
    for key, value in data.items():
        if isinstance(value, (str, list)) and all(isinstance(v, str) for v in ([value] if isinstance(value, str) else value)):
            files = [value] if isinstance(value, str) else value
            result[key] = [str((path.parent / f).resolve()) if not Path(f).is_absolute() else f for f in files]
        elif isinstance(value, dict):
            result[key] = Prompts.from_dict(value)
        else:
            raise InputError(f"prompts for {key!r} in {path} must be an object or markups file path(s)")
    return result


def prompts_from_markups(files: list[str], geometry: VolumeGeometry) -> Prompts:
    """Slicer ``.mrk.json`` markups -> voxel prompts: an ROI gives the box, control points give clicks.

    Control points of a point list whose name contains "neg" (or whose control point label does)
    become negative clicks. Coordinates are RAS or LPS as the file's ``coordinateSystem`` says.
    """
    prompts = Prompts()
    for file in files:
        try:
            document = json.loads(Path(file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read markups file {file}: {exc}") from None
        for markup in document.get("markups", []):
            to_index = geometry.lps_to_index if markup.get("coordinateSystem", "LPS") == "LPS" else geometry.ras_to_index
            kind = markup.get("type", "")
            if kind == "ROI":
                corners = _roi_corners(markup)
                ijk = to_index(corners)
                lower = np.clip(np.floor(ijk.min(axis=0) + 0.5), 0, np.array(geometry.size) - 1)
                upper = np.clip(np.floor(ijk.max(axis=0) + 0.5), 0, np.array(geometry.size) - 1)
                prompts.box = tuple(int(v) for v in (*lower, *upper))
            elif kind == "Fiducial":
                negative_list = "neg" in markup.get("name", "").lower()
                for point in markup.get("controlPoints", []):
                    ijk = tuple(float(v) for v in np.round(to_index(np.array(point["position"], dtype=float))))
                    negative = negative_list or "neg" in point.get("label", "").lower()
                    (prompts.negatives if negative else prompts.positives).append(ijk)
    return prompts


def _roi_corners(markup: dict) -> np.ndarray:
    center = np.asarray(markup.get("center") or markup["controlPoints"][0]["position"], dtype=float)
    size = np.asarray(markup["size"], dtype=float)
    axes = np.asarray(markup.get("orientation", np.eye(3).ravel()), dtype=float).reshape(3, 3)
    signs = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
    # Slicer stores the ROI axes as the columns of the row-major orientation matrix.
    return center + (signs * size) @ axes.T


def _prompts_for(case: Case, table: dict[str, Prompts | list[str]], geometry: VolumeGeometry) -> Prompts | None:
    for key in (case.source, str(Path(case.source).resolve()), Path(case.source).name, case.name):
        if key in table:
            value = table[key]
            return prompts_from_markups(value, geometry) if isinstance(value, list) else value
    return None


# ---------------------------------------------------------------------------- running
def output_path_for(case: Case, output_dir: Path, output_format: str) -> Path:
    return output_dir / f"{case.name}.{output_format}"


def output_is_valid(output: Path, image: MedicalImage | None = None) -> bool:
    """Whether an existing output can be read (and, given the image, lies on its grid)."""
    if not output.is_file():
        return False
    try:
        label = read_label(output)
    except (InputError, RuntimeError, ValueError, OSError):
        return False
    return image is None or label.geometry.same_grid(image.geometry)


def run_batch(inputs: Iterable[str | os.PathLike], output_dir: str | os.PathLike, settings: BatchSettings,
              progress: Callable[[int, int, CaseResult], None] | None = None,
              cancel: threading.Event | None = None, model=None) -> list[CaseResult]:
    """Segment every case, writing one label file per case and ``summary.csv`` in ``output_dir``.

    A case that fails is recorded and the run goes on. ``summary.csv`` is rewritten atomically
    after every case, so an interrupted run still leaves a valid summary.

    Args:
        inputs: Files and folders.
        output_dir: Created when missing.
        settings: Adapter, prompts, format, device, resume, slicing axis, 3D-box strategy.
        progress: Called as ``progress(done, total, result)`` after each case.
        cancel: Set it to stop after the current case (raises :class:`CancelledError`).
        model: An already loaded model to reuse (the Slicer module passes its own).

    Returns:
        One :class:`CaseResult` per case, in input order.
    """
    from .api import load_segmenter, segment_image
    from .io import write_label
    from .inference import PredictorSettings

    predictor_settings = PredictorSettings(box3d_strategy=settings.box3d_strategy)  # checked before any work
    if settings.output_format not in OUTPUT_FORMATS:
        raise InputError(f"unknown format {settings.output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cases = discover_cases(inputs)
    if not cases:
        raise InputError("no input cases given")
    if settings.adapter is None and not settings.prompts:
        raise InputError("batch work needs --adapter (automatic segmentation) or --prompts FILE")
    adapter_info = None
    if model is None:
        model, adapter_info = load_segmenter(settings.model_name, settings.checkpoint, settings.adapter,
                                             settings.device, settings.backend, settings.precision)
    results: list[CaseResult] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_read_case, cases[0])
        for index, case in enumerate(cases):
            if cancel is not None and cancel.is_set():
                raise CancelledError("batch cancelled")
            image, read_error = pending.result()
            if index + 1 < len(cases):
                pending = reader.submit(_read_case, cases[index + 1])  # overlaps reading with compute
            output = output_path_for(case, output_dir, settings.output_format)
            started = time.perf_counter()
            result = CaseResult(case.source if case.dicom_files is None else f"{case.source} (DICOM series)",
                                str(output), "ok")
            try:
                if read_error is not None:
                    raise read_error
                if settings.resume and output_is_valid(output, image):
                    result.status = "skipped"
                else:
                    prompts = _prompts_for(case, settings.prompts, image.geometry) or Prompts()
                    if prompts.is_empty and (adapter_info is None or not adapter_info.automatic):
                        raise InputError("no prompts for this case and no automatic adapter")
                    mask = segment_image(model, image, prompts, axis=settings.axis, adapter_info=adapter_info,
                                         settings=predictor_settings, cancel=cancel)
                    name = adapter_info.label_name if adapter_info is not None else "Segment_1"
                    write_label(mask, image.geometry, output, is_2d=image.is_2d, segment_name=name)
                    result.foreground_voxels = int(mask.sum())
            except CancelledError:
                raise
            except (InputError, RuntimeError, ValueError, OSError) as exc:
                result.status, result.error = "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            result.seconds = time.perf_counter() - started
            results.append(result)
            write_summary(results, output_dir / "summary.csv")
            if progress is not None:
                progress(index + 1, len(cases), result)
    return results


def _read_case(case: Case) -> tuple[MedicalImage | None, Exception | None]:
    try:
        return case.read(), None
    except (InputError, RuntimeError, ValueError, OSError) as exc:
        return None, exc


def write_summary(results: list[CaseResult], path: Path) -> None:
    """Write ``summary.csv`` atomically."""
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for result in results:
        writer.writerow(result.row())
    fd_path = path.with_name(f".{path.name}.partial")
    fd_path.write_text(buffer.getvalue())
    os.replace(fd_path, path)


# ---------------------------------------------------------------------------- command line
def register_cli(commands) -> None:
    parser = commands.add_parser("batch", help="segment many images (files, folders, DICOM series)",
                                 description="Segment every case automatically with an adapter, or from "
                                             "per-case prompts. Writes one label file per case and summary.csv.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, DICOM folders")
    parser.add_argument("-o", "--output-dir", required=True, help="output folder (created if missing)")
    parser.add_argument("--adapter", help="adapter folder trained for automatic segmentation")
    parser.add_argument("--prompts", help="JSON file mapping inputs to prompts or to Slicer .mrk.json files")
    parser.add_argument("--format", default="nii.gz", choices=OUTPUT_FORMATS, help="output format")
    parser.add_argument("--resume", action="store_true", help="skip cases whose output exists and is valid")
    parser.add_argument("--axis", default="auto", choices=["auto", "axial", "coronal", "sagittal"])
    from .cli import add_backend_option, add_box3d_strategy_option

    add_box3d_strategy_option(parser)
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="auto")
    add_backend_option(parser)
    parser.set_defaults(handler=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> int:
    settings = BatchSettings(adapter=args.adapter, model_name=args.model, checkpoint=args.checkpoint,
                             device=args.device, backend=args.backend, precision=args.precision, output_format=args.format, resume=args.resume, axis=args.axis,
                             box3d_strategy=args.box3d_strategy, prompts=load_prompts_file(args.prompts) if args.prompts else {})

    def report(done: int, total: int, result: CaseResult) -> None:
        detail = result.error if result.status == "failed" else f"{result.foreground_voxels} voxels"
        print(f"case {done}/{total} {result.status} {Path(result.output).name} {result.seconds:.1f} s {detail}",
              flush=True)

    results = run_batch(args.inputs, args.output_dir, settings, progress=report)
    failed = sum(r.status == "failed" for r in results)
    print(f"{len(results) - failed} of {len(results)} cases done; summary in {Path(args.output_dir) / 'summary.csv'}")
    return 1 if failed else 0
