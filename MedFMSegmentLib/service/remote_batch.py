"""``medfmsegment batch ... --server URL``: the local batch, each case segmented by a service.

Cases, outputs, resume records, ``summary.csv``, per-case failures and exit codes are those of
:func:`MedFMSegmentLib.batch.run_batch`, which runs unchanged with a :class:`RemoteSegmenter` in
place of a loaded model: each image is read here, uploaded (once: its id follows its content),
segmented there (a one-slice prompt answered at once; a 3D prompt or automatic segmentation with
the service's adapter as a job) and the mask written here, atomically.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterable

import numpy as np

from ..batch import BatchSettings, CaseResult, run_batch
from ..errors import InputError
from ..integrity import check_finite
from ..io import MedicalImage
from ..prompts import Prompts
from .client import ServiceClient
from .remote import connect, follow_job, service_errors

__all__ = ["RemoteSegmenter", "run_batch_remote"]


class RemoteSegmenter:
    """Segments images on the service behind ``client`` (what ``run_batch`` takes as its model).

    Args:
        client, info: A connected client and the service's info (:func:`.remote.connect`).
        server: The service's URL, for messages.
        model_name: The model to prompt (ignored with an adapter: the adapter's base model).
        adapter: The name of an adapter in the service's folder, or None.
    """

    def __init__(self, client: ServiceClient, info: dict, server: str, model_name: str | None,
                 adapter: str | None = None) -> None:
        from ..finetune.adapters import AdapterInfo

        self.client, self.info, self.server, self.adapter = client, info, server, adapter
        self.model_name = None if adapter else model_name
        self.adapter_info = None
        if self.model_name is not None and self.model_name not in info.get("models", []):
            raise InputError(f"the service does not serve model {self.model_name} "
                             f"(it serves {', '.join(info.get('models', []))})")
        if adapter is not None:
            with service_errors(server):
                found = [a for a in client.adapters() if a["name"] == adapter]
            if not found:
                raise InputError(f"the service at {server} has no adapter named {adapter!r}")
            self.adapter_info = AdapterInfo.from_metadata(found[0]["metadata"])

    def identity(self) -> dict:
        """What the service's results depend on (the resume records): its library version and
        model, the adapter's weights. Not its address: a restarted service gets another port."""
        metadata = self.adapter_info.metadata if self.adapter_info is not None else {}
        return {"service": self.info.get("versions", {}).get("medfmsegment", ""),
                "name": self.model_name or metadata.get("base_model", {}).get("name", ""),
                "adapter": None if self.adapter is None else {"name": self.adapter,
                                                              "weights_sha256": metadata.get("weights_sha256", "")}}

    def segment_image(self, image: MedicalImage, prompts: Prompts, *, axis: str = "auto", adapter_info=None,
                      settings=None, cancel: threading.Event | None = None) -> np.ndarray:
        """:func:`MedFMSegmentLib.api.segment_image` on the service: the ``(K, J, I)`` mask."""
        check_finite(image.array, image.source or "the image")
        with service_errors(self.server):
            vid = self.client.upload_volume(image.array, image.geometry, image.is_2d, image.modality)
            if prompts.is_empty:
                return follow_job(self.client, self.client.automatic(vid, self.adapter), cancel=cancel)
            strategy = settings.box3d_strategy if settings is not None else None
            reply = self.client.prompt(vid, prompts, axis=axis, model=self.model_name, adapter=self.adapter,
                                       box3d_strategy=strategy)
            if reply.mask is not None:
                return reply.mask
            return follow_job(self.client, reply.job_id, cancel=cancel)


def run_batch_remote(inputs: Iterable[str | os.PathLike], output_dir: str | os.PathLike, settings: BatchSettings,
                     *, server: str, token_file: str | os.PathLike | None = None,
                     progress: Callable[[int, int, CaseResult], None] | None = None,
                     cancel: threading.Event | None = None) -> list[CaseResult]:
    """:func:`MedFMSegmentLib.batch.run_batch` with every case segmented on the service at ``server``.

    ``settings.adapter`` names an adapter of the service; ``checkpoint`` cannot be sent (the
    service serves the models it was started with); ``device``, ``backend`` and ``precision`` are
    the service's own. The inputs and the output folder are checked before the service is asked
    anything; an unreachable service or a refused token is one :class:`InputError` line.
    """
    from ..batch import check_batch

    if settings.checkpoint is not None:
        raise InputError("--checkpoint cannot be sent to a service: it serves the models it was started with")
    check_batch(inputs, output_dir, settings, local_adapter=False)  # bad input: refused before connecting
    client, info = connect(server, token_file)
    segmenter = RemoteSegmenter(client, info, server, settings.model_name, settings.adapter)
    try:
        return run_batch(inputs, output_dir, settings, progress=progress, cancel=cancel, model=segmenter,
                         adapter_info=segmenter.adapter_info)
    finally:
        client.close()
