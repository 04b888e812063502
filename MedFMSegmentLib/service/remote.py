"""The commands on a service (``--server URL``): the same files as in process, computed there.

``segment --server`` is :func:`segment_file_remote`; ``batch --server`` and ``finetune --server``
live beside it (:mod:`.remote_batch`, :mod:`.remote_finetune`) and share :func:`connect` (one
line, never a traceback, when the service cannot be reached or refuses the token) and
:func:`follow_job` (Ctrl-C or ``cancel`` cancels the job on the service).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from ..api import SegmentResult, check_segment_request
from ..errors import CancelledError, InputError
from ..io import label_format, read_image, write_label
from ..prompts import Prompts
from .client import JobStatus, ServiceClient, ServiceError, read_token

__all__ = ["connect", "service_errors", "follow_job", "segment_file_remote"]


@contextlib.contextmanager
def service_errors(server: str) -> Iterator[None]:
    """Turn a refused or failed request into one :class:`InputError` line naming the service."""
    try:
        yield
    except ServiceError as exc:
        raise InputError(f"service {server}: {exc.message}") from None


def connect(server: str, token_file: str | os.PathLike | None = None,
            timeout: float = 600.0) -> tuple[ServiceClient, dict]:
    """``(client, info)`` of the service at ``server``, the token from ``token_file`` or
    ``$MEDFMSEGMENT_TOKEN``; :class:`InputError` when it cannot be reached or refuses the token."""
    with service_errors(server):
        client = ServiceClient(server, read_token(token_file), timeout=timeout)
        return client, client.info()


def follow_job(client: ServiceClient, job_id: str, on_status: Callable[[JobStatus], None] | None = None,
               cancel: threading.Event | None = None, poll: float = 0.2):
    """Poll a job until it ends; its result. ``on_status`` sees each status. Ctrl-C (KeyboardInterrupt)
    or ``cancel`` cancels the job on the service first (then re-raised, or CancelledError); a job
    that failed is one :class:`InputError` line."""
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled")
            status = client.job(job_id)
            if on_status is not None:
                on_status(status)
            if status.finished:
                break
            time.sleep(poll)
    except (KeyboardInterrupt, CancelledError):
        _cancel_on_service(client, job_id)
        raise
    if status.state != "done":
        raise InputError(f"job {status.state} on the service: {status.message}")
    return client.result(job_id)


def _cancel_on_service(client: ServiceClient, job_id: str, wait: float = 30.0) -> None:
    """Cancel a job and wait (up to ``wait`` seconds) until the service says it stopped."""
    deadline = time.monotonic() + wait
    try:
        client.cancel(job_id)
        while not client.job(job_id).finished and time.monotonic() < deadline:
            time.sleep(0.1)
    except ServiceError:
        pass  # the service is gone: nothing left to cancel there


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
    check_segment_request(image, fmt, prompts, adapter is not None)
    client, names = connect(server, token_file)
    with service_errors(server):
        model = None if adapter else model_name
        if model is not None and model not in names.get("models", []):
            raise InputError(f"the service does not serve model {model} (it serves {', '.join(names['models'])})")
        vid = client.upload_volume(image.array, image.geometry, image.is_2d, image.modality)
        settings = None if intensity is None or (adapter and intensity.mode == "auto") else \
            {"mode": intensity.mode, "window": list(intensity.window)}
        if prompts.is_empty:
            mask = follow_job(client, client.automatic(vid, adapter, keep_components))
        else:
            reply = client.prompt(vid, prompts, axis=axis, model=model, adapter=adapter,
                                  box3d_strategy=box3d_strategy, propagate=propagate, intensity=settings)
            mask = reply.mask if reply.mask is not None else follow_job(client, reply.job_id)
        name = "Segment_1"
        if adapter:
            from ..finetune.adapter_format import METADATA_DEFAULTS

            found = [a for a in client.adapters() if a["name"] == adapter]
            name = (found[0]["metadata"] if found else {}).get("label_name", METADATA_DEFAULTS["label_name"])
        device = names.get("device", "service")
    write_label(mask, image.geometry, output_path, is_2d=image.is_2d, segment_name=name)
    return SegmentResult(output_path, mask, int(mask.sum()), f"{device} via {server}", "service")
