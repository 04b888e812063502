"""``medfmsegment segment ... --server URL``: the same file as in process, computed by a service."""

from __future__ import annotations

import os
from pathlib import Path

from ..api import SegmentResult
from ..errors import InputError
from ..io import label_format, read_image, write_label
from ..prompts import Prompts
from .client import ServiceClient, ServiceError, read_token

__all__ = ["segment_file_remote"]


def segment_file_remote(image_path: str | os.PathLike, output_path: str | os.PathLike, prompts: Prompts, *,
                        server: str, token_file: str | None = None, model_name: str | None = None,
                        checkpoint=None, adapter: str | None = None, axis: str = "auto", intensity=None,
                        propagate: bool | None = None, keep_components: str | None = None,
                        box3d_strategy: str = "auto", **ignored) -> SegmentResult:
    """:func:`MedFMSegmentLib.api.segment_file` on the service at ``server``.

    The image is read and checked here, sent once (content-derived id), segmented there, and the
    label written here atomically. ``adapter`` names an adapter in the service's folder. The
    service's device and backend are its own (``device``, ``backend``, ``precision`` are ignored).
    """
    output_path = Path(output_path)
    fmt = label_format(output_path)
    if not output_path.parent.exists():
        raise InputError(f"output folder does not exist: {output_path.parent}")
    if checkpoint is not None:
        raise InputError("--checkpoint cannot be sent to a service: it serves the models it was started with")
    image = read_image(image_path)
    if fmt == ".png" and not image.is_2d and image.geometry.size[2] != 1:
        raise InputError("PNG output needs a 2D image; use .nii.gz, .nrrd or .seg.nrrd for volumes")
    prompts.validate(image.geometry)
    if prompts.is_empty and adapter is None:
        raise InputError("at least one prompt (--box or --point) is needed without an automatic adapter")
    try:
        client = ServiceClient(server, read_token(token_file), timeout=600.0)
        names = client.info()
        model = None if adapter else model_name
        if model is not None and model not in names.get("models", []):
            raise InputError(f"the service does not serve model {model} (it serves {', '.join(names['models'])})")
        vid = client.upload_volume(image.array, image.geometry, image.is_2d, image.modality)
        settings = None if intensity is None or (adapter and intensity.mode == "auto") else \
            {"mode": intensity.mode, "window": list(intensity.window)}
        if prompts.is_empty:
            mask = client.wait(client.automatic(vid, adapter, keep_components))
        else:
            reply = client.prompt(vid, prompts, axis=axis, model=model, adapter=adapter,
                                  box3d_strategy=box3d_strategy, propagate=propagate, intensity=settings)
            mask = reply.mask if reply.mask is not None else client.wait(reply.job_id)
        name = "Segment_1"
        if adapter:
            found = [a for a in client.adapters() if a["name"] == adapter]
            name = found[0]["metadata"].get("label_name", "label") if found else "label"
        device = names.get("device", "service")
    except ServiceError as exc:
        raise InputError(f"service {server}: {exc.message}") from None
    write_label(mask, image.geometry, output_path, is_2d=image.is_2d, segment_name=name)
    return SegmentResult(output_path, mask, int(mask.sum()), f"{device} via {server}", "service")
