"""A small client of ``medfmsegment serve``: plain Python (http.client), no Qt, no extra package.

Each call is one or two short HTTP requests on a kept-alive connection, so a UI can poll a job
from a timer. The requests and the reading of their answers are :mod:`.protocol`'s (the Slicer
module sends the same ones through Qt); arrays go as frames (:mod:`.wire`). Errors raise :class:`ServiceError` with the HTTP
status and the server's one-line message (status 0: the service could not be reached).

Example:
    >>> client = ServiceClient("http://127.0.0.1:8765", token=open(token_file).read().strip())
    >>> vid = client.upload_volume(image.array, image.geometry)
    >>> reply = client.prompt(vid, {"box": [10, 12, 5, 30, 40, 5]})     # one slice: answered at once
    >>> mask = reply.mask                                               # (K, J, I) bool
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import protocol
from .protocol import API, HttpRequest, JobStatus, PromptReply, Response, ServiceError, Steps, checked

__all__ = ["ServiceClient", "ServiceError", "PromptReply", "JobStatus", "read_token", "API"]


def read_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The token in ``token_file``, else ``$MEDFMSEGMENT_TOKEN``, else None."""
    if token_file:
        try:
            return open(token_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise ServiceError(0, f"cannot read token file {token_file}: {exc.strerror or exc}") from None
    return os.environ.get("MEDFMSEGMENT_TOKEN") or None


class ServiceClient:
    """Client of one service at ``url`` (``http://host:port``); thread-safe (one request at a time).

    Each verb runs the :mod:`.protocol` generator of the same name over this client's connection.

    Args:
        url: The service's address, as its ready line printed it.
        token: The bearer token (None: ``$MEDFMSEGMENT_TOKEN``).
        timeout: Seconds one request may take (uploads of big volumes: raise it).
        compression: zlib level of uploads (None: 0, none, to a loopback address, where
            compressing costs more time than sending; 1 elsewhere).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0,
                 compression: int | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ServiceError(0, f"service URL must be http://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self._parsed = parsed
        self.token = token if token is not None else read_token()
        self.timeout = timeout
        loopback = parsed.hostname in ("localhost", "::1") or parsed.hostname.startswith("127.")
        self.compression = (0 if loopback else 1) if compression is None else compression
        self._connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ transport
    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._parsed.scheme == "https" else http.client.HTTPConnection
        return kind(self._parsed.hostname, self._parsed.port, timeout=self.timeout)

    def exchange(self, request: HttpRequest) -> Response:
        """Send one request; its answer whatever the status (status 0: the service was not reached)."""
        headers = {"Authorization": f"Bearer {self.token or ''}"}
        if request.content_type is not None:
            headers["Content-Type"] = request.content_type
        with self._lock:
            for attempt in (0, 1):
                if self._connection is None:
                    self._connection = self._connect()
                try:
                    self._connection.request(request.method, request.target, body=request.body, headers=headers)
                    response = self._connection.getresponse()
                    data = response.read()
                    break
                except (ConnectionError, http.client.HTTPException, OSError) as exc:
                    self._connection.close()
                    self._connection = None
                    # A kept-alive connection the server closed: retry once on a fresh one.
                    if attempt == 1 or not isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                            BrokenPipeError)):
                        return Response(0, "", b"", f"cannot reach the service at {self.url}: {exc}")
            if response.getheader("Connection", "").lower() == "close":
                self._connection.close()
                self._connection = None
        return Response(response.status, response.getheader("Content-Type", ""), data, response.reason)

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                query: dict | None = None) -> tuple[int, str, bytes]:
        """Send one request; ``(status, content type, body)`` of a 2xx answer, else ServiceError."""
        json_body, frame = (body, None) if isinstance(body, dict) else (None, body)
        response = self.exchange(HttpRequest(method, path, json=json_body, frame=frame, query=query))
        if not 200 <= response.status < 300:
            raise response.error()
        return response.status, response.content_type, response.data

    def _run(self, steps: Steps) -> Any:
        """Run one :mod:`.protocol` verb: send each request it yields, hand it the answer."""
        steps = checked(steps)
        try:
            request = next(steps)
            while True:
                request = steps.send(self.exchange(request))
        except StopIteration as stop:
            return stop.value

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # ------------------------------------------------------------------ resources
    def info(self) -> dict:
        """Versions, device, models, adapters and limits of the service."""
        return self._run(protocol.info())

    def has_volume(self, vid: str) -> bool:
        return self._run(protocol.has_volume(vid))

    def upload_volume(self, array_kji: np.ndarray, geometry, is_2d: bool = False, modality: str | None = None) -> str:
        """Send a ``(K, J, I)`` volume on ``geometry`` once; returns its content-derived id (nothing
        is sent when the service already holds it)."""
        return self._run(protocol.upload_volume(array_kji, geometry, is_2d, modality, compression=self.compression))

    def delete_volume(self, vid: str) -> None:
        self._run(protocol.delete_volume(vid))

    def focus(self, vid: str, axis: str | int, index: int, model: str | None = None, adapter: str | None = None,
              radius: int = 2) -> dict:
        """Embed slice ``index`` along ``axis`` (a name or voxel axis 0 = I, 1 = J, 2 = K) and
        ``radius`` neighbours each side ahead of a prompt, in the background."""
        return self._run(protocol.focus(vid, axis, index, model, adapter, radius))

    def prompt(self, vid: str, prompts, *, axis: str | int = "auto", model: str | None = None,
               adapter: str | None = None, box3d_strategy: str | None = None, propagate: bool | None = None,
               intensity: dict | None = None) -> PromptReply:
        """Segment from ``prompts`` (a :class:`~MedFMSegmentLib.prompts.Prompts` or its dict: box,
        points, negatives in voxel indices): a one-slice prompt answers with ``.mask``, others
        with ``.job_id``."""
        return self._run(protocol.prompt(vid, prompts, axis=axis, model=model, adapter=adapter,
                                         box3d_strategy=box3d_strategy, propagate=propagate, intensity=intensity))

    def automatic(self, vid: str, adapter: str, keep_components: str | None = None) -> str:
        """Start prompt-free segmentation of a volume with ``adapter``; returns the job id."""
        return self._run(protocol.automatic(vid, adapter, keep_components))

    def finetune(self, images: list, labels: list, config: dict) -> str:
        """Start fine-tuning a new adapter (``config["name"]``) on image/label pairs: volume ids, or
        :class:`~MedFMSegmentLib.io.MedicalImage` objects (uploaded first); returns the job id."""
        return self._run(protocol.finetune(images, labels, config, compression=self.compression))

    def job(self, job_id: str) -> JobStatus:
        return self._run(protocol.job(job_id))

    def updates(self, job_id: str, since: int = 0) -> tuple[int, list[tuple[int, int, np.ndarray]]]:
        """``(next cursor, [(array_axis, index, plane), ...])``: result slices written since ``since``
        (``array_axis``: numpy axis of the ``(K, J, I)`` mask). Replaying all of them in order on an
        empty mask gives the final result."""
        return self._run(protocol.updates(job_id, since))

    def reports(self, job_id: str, since: int = 0) -> tuple[int, list[dict]]:
        """``(next cursor, [report, ...])``: a job's progress reports since ``since``, each as the
        library gave it (fine-tuning: ``{"stage": "embedding", "done", "total"}``, then
        ``{"step", "steps", "loss", "val_dice"}`` per step), so a client can print every one."""
        return self._run(protocol.reports(job_id, since))

    def result(self, job_id: str):
        """A finished job's result: the ``(K, J, I)`` bool mask, or a dict (fine-tuning: the adapter)."""
        return self._run(protocol.result(job_id))

    def cancel(self, job_id: str) -> JobStatus:
        return self._run(protocol.cancel(job_id))

    def adapters(self) -> list[dict]:
        """Adapters of the service: ``{"name", "metadata"}`` each."""
        return self._run(protocol.adapters())

    def download_adapter(self, name: str, folder: str | os.PathLike) -> Path:
        """Copy the service's adapter ``name`` into the new local folder ``folder`` (written atomically)."""
        from .archive import ArchiveError, unpack_adapter

        try:
            return unpack_adapter(self._run(protocol.adapter_archive(name)), folder)
        except ArchiveError as exc:
            raise ServiceError(0, str(exc)) from None

    def upload_adapter(self, folder: str | os.PathLike, name: str | None = None) -> dict:
        """Send a local adapter folder to the service as the new adapter ``name`` (default: the
        folder's name; an existing one is never replaced: 409)."""
        from .archive import ArchiveError, pack_adapter

        try:
            data = pack_adapter(folder)
        except ArchiveError as exc:
            raise ServiceError(0, str(exc)) from None
        return self._run(protocol.upload_adapter_archive(name or Path(folder).name, data))

    def wait(self, job_id: str, poll: float = 0.2, progress: Callable[[JobStatus], None] | None = None,
             timeout: float | None = None):
        """Poll a job until it finishes; its result, or ServiceError when it failed or was cancelled."""
        started = time.monotonic()
        while True:
            status = self.job(job_id)
            if progress is not None:
                progress(status)
            if status.finished:
                break
            if timeout is not None and time.monotonic() - started > timeout:
                raise ServiceError(408, f"job {job_id} still {status.state} after {timeout} s")
            time.sleep(poll)
        if status.state != "done":
            raise ServiceError(409, f"job {status.state}: {status.message}")
        return self.result(job_id)
