"""High-level functions shared by the command line, batch work and the Slicer module."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import check_output_file, refuse_overlap, sweep_leftovers
from .integrity import check_finite
from .io import MedicalImage, label_format, read_image, write_label
from .loading import load_model
from .models import DEFAULT_MODEL, PromptableModel
from .inference import PredictorSettings, SegmentationSession
from .preprocessing import IntensitySettings
from .prompts import Prompts

__all__ = ["SegmentResult", "check_segment_request", "load_segmenter", "segment_file", "segment_image"]


@dataclass
class SegmentResult:
    """What :func:`segment_file` produced."""

    output: Path
    mask: np.ndarray
    foreground_voxels: int
    device: str
    backend: str = "torch"


def load_segmenter(model_name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
                   adapter: str | os.PathLike | None = None, device: str = "auto", backend: str | None = None,
                   precision: str | None = None):
    """Load a model and, when given, apply a fine-tuned adapter to it.

    ``backend`` and ``precision`` choose the inference engine (see
    :func:`MedFMSegmentLib.loading.load_model`).

    Returns:
        ``(model, adapter_info)``; ``adapter_info`` is None without an adapter, else the
        adapter's metadata (intensity settings, label, automatic-mode support).
    """
    if adapter is None:
        return load_model(model_name, checkpoint, device, backend=backend, precision=precision), None
    try:
        from .finetune.adapters import load_adapted_model
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("MedFMSegmentLib"):
            raise InputError("adapters need the fine-tuning module, which this installation lacks") from None
        raise
    return load_adapted_model(adapter, model_name=model_name, checkpoint=checkpoint, device=device, backend=backend,
                              precision=precision)


def segment_image(model: PromptableModel, image: MedicalImage, prompts: Prompts, *, axis: str = "auto",
                  intensity: IntensitySettings | None = None, propagate: bool | None = None,
                  adapter_info=None, keep_components: str | None = None,
                  settings: PredictorSettings | None = None, progress=None, cancel=None) -> np.ndarray:
    """Segment an in-memory image: prompted, or automatic with an adapter trained for it.

    Returns:
        ``(K, J, I)`` boolean mask on the image's grid.
    """
    check_finite(image.array, image.source or "the image")
    if adapter_info is not None and intensity is None:
        intensity = adapter_info.intensity
    if adapter_info is not None and axis == "auto":
        # An adapter has seen slices of one orientation only: keep to it.
        axis = adapter_info.axis
    session = SegmentationSession(model, image, axis=axis, intensity=intensity, settings=settings)
    if prompts.is_empty:
        if adapter_info is None or not adapter_info.automatic:
            raise InputError("at least one prompt (--box or --point) is needed without an automatic adapter")
        from .inference.automatic import segment_automatic

        return segment_automatic(session, keep=keep_components or adapter_info.keep_components,
                                 progress=progress, cancel=cancel)
    return session.segment(prompts, propagate=propagate, progress=progress, cancel=cancel)


def check_segment_request(image: MedicalImage, output_format: str, prompts: Prompts, with_adapter: bool) -> None:
    """Refuse, in one line, what no segmentation of ``image`` into ``output_format`` (from
    :func:`~MedFMSegmentLib.io.label_format`) can do: a PNG of a volume, prompts outside the image,
    or no prompt without an adapter (an adapter trained for automatic mode needs none)."""
    if output_format == ".png" and not image.is_2d and image.geometry.size[2] != 1:
        raise InputError("PNG output needs a 2D image; use .nii.gz, .nrrd or .seg.nrrd for volumes")
    prompts.validate(image.geometry)
    if prompts.is_empty and not with_adapter:
        raise InputError("at least one prompt (--box or --point) is needed without an automatic adapter")


def segment_file(image_path: str | os.PathLike, output_path: str | os.PathLike, prompts: Prompts, *,
                 model_name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
                 adapter: str | os.PathLike | None = None, device: str = "auto", backend: str | None = None,
                 precision: str | None = None, axis: str = "auto",
                 intensity: IntensitySettings | None = None, propagate: bool | None = None,
                 keep_components: str | None = None, box3d_strategy: str = "auto",
                 series: str | None = None, progress=None) -> SegmentResult:
    """Read an image, segment it and write the label map on the image's exact grid.

    Everything that can be checked is checked before the model runs (the output is not an input,
    is writable, not a folder; the image is readable, finite; the prompts lie inside it), and the
    output is written atomically, so a failure never leaves a partial file. ``box3d_strategy`` is
    :attr:`PredictorSettings.box3d_strategy`; ``series`` picks one DICOM series of a folder;
    ``progress(done, planned)`` is called as slices finish.
    """
    settings = PredictorSettings(box3d_strategy=box3d_strategy)
    output_path = Path(output_path)
    fmt = label_format(output_path)
    inputs = [image_path] + ([adapter] if adapter is not None else []) + ([checkpoint] if checkpoint else [])
    refuse_overlap([output_path], inputs)
    check_output_file(output_path)
    sweep_leftovers(output_path.parent, [output_path.name])
    image = read_image(image_path, series=series)
    check_finite(image.array, str(image_path))
    check_segment_request(image, fmt, prompts, adapter is not None)
    model, adapter_info = load_segmenter(model_name, checkpoint, adapter, device, backend, precision)
    mask = segment_image(model, image, prompts, axis=axis, intensity=intensity, propagate=propagate,
                         adapter_info=adapter_info, keep_components=keep_components, settings=settings,
                         progress=progress)
    name = adapter_info.label_name if adapter_info is not None else "Segment_1"
    write_label(mask, image.geometry, output_path, is_2d=image.is_2d, segment_name=name)
    return SegmentResult(output_path, mask, int(mask.sum()), str(model.device), model.backend)
