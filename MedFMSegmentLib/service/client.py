"""A small client of ``medfmsegment serve``: plain Python (http.client), no Qt, no extra package.

Each call is one short HTTP request on a kept-alive connection, so a UI can poll a job from a
timer. Arrays go as frames (:mod:`.wire`). Errors raise :class:`ServiceError` with the HTTP
status and the server's one-line message (status 0: the service could not be reached).

Example:
    >>> client = ServiceClient("http://127.0.0.1:8765", token=open(token_file).read().strip())
    >>> vid = client.upload_volume(image.array, image.geometry)
    >>> reply = client.prompt(vid, {"box": [10, 12, 5, 30, 40, 5]})     # one slice: answered at once
    >>> mask = reply.mask                                               # (K, J, I) bool
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..geometry import slice_into_volume, voxel_axis_of
from .wire import MEDIA_TYPE, WireError, decode_frame, encode_frame, geometry_to_dict, volume_id

__all__ = ["ServiceClient", "ServiceError", "PromptReply", "JobStatus", "read_token"]

API = "/v1"


class ServiceError(Exception):
    """A refused or failed request: ``status`` (HTTP, 0 when unreachable) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class PromptReply:
    """What a prompt gave: ``mask`` at once (a one-slice prompt) or a ``job_id`` to follow.

    ``array_axis``/``index``/``plane``: the segmented slice of a one-slice prompt (numpy axis of the
    ``(K, J, I)`` mask and the slice's position), for a viewer that updates one slice only.
    """

    mask: np.ndarray | None = None
    job_id: str | None = None
    array_axis: int | None = None
    index: int | None = None
    plane: np.ndarray | None = None


@dataclass
class JobStatus:
    """A job's state (``queued``, ``running``, ``done``, ``failed``, ``cancelled``) and progress."""

    job_id: str
    kind: str
    state: str
    done: int
    planned: int
    stage: str
    message: str
    metrics: dict = field(default_factory=dict)
    updates: int = 0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


def read_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The token in ``token_file``, else ``$MEDFMSEGMENT_TOKEN``, else None."""
    if token_file:
        try:
            return open(token_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise ServiceError(0, f"cannot read token file {token_file}: {exc.strerror or exc}") from None
    return os.environ.get("MEDFMSEGMENT_TOKEN") or None


def _mask_from_frame(header: dict, arrays: list[np.ndarray]) -> np.ndarray:
    if header.get("kind") == "slice":
        mask = np.zeros(tuple(header["shape"]), dtype=bool)
        slice_into_volume(mask, voxel_axis_of(int(header["array_axis"])), int(header["index"]), arrays[0])
        return mask
    return arrays[0].astype(bool, copy=False)


class ServiceClient:
    """Client of one service at ``url`` (``http://host:port``); thread-safe (one request at a time).

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

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                query: dict | None = None) -> tuple[int, str, bytes]:
        """Send one request; ``(status, content type, body)`` of a 2xx answer, else ServiceError."""
        headers = {"Authorization": f"Bearer {self.token or ''}"}
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = MEDIA_TYPE
        target = API + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with self._lock:
            for attempt in (0, 1):
                if self._connection is None:
                    self._connection = self._connect()
                try:
                    self._connection.request(method, target, body=body, headers=headers)
                    response = self._connection.getresponse()
                    data = response.read()
                    break
                except (ConnectionError, http.client.HTTPException, OSError) as exc:
                    self._connection.close()
                    self._connection = None
                    # A kept-alive connection the server closed: retry once on a fresh one.
                    if attempt == 1 or not isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                            BrokenPipeError)):
                        raise ServiceError(0, f"cannot reach the service at {self.url}: {exc}") from None
            if response.getheader("Connection", "").lower() == "close":
                self._connection.close()
                self._connection = None
        if not 200 <= response.status < 300:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data[:200].decode("utf-8", "replace").strip() or response.reason
            raise ServiceError(response.status, str(message))
        return response.status, response.getheader("Content-Type", ""), data

    def _json(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> Any:
        return json.loads(self.request(method, path, body, query)[2] or b"null")

    def _frame(self, method: str, path: str, body: dict | None = None, query: dict | None = None):
        _, kind, data = self.request(method, path, body, query)
        try:
            return decode_frame(data)
        except WireError as exc:
            raise ServiceError(0, f"malformed answer from the service: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # ------------------------------------------------------------------ resources
    def info(self) -> dict:
        """Versions, device, models, adapters and limits of the service."""
        return self._json("GET", "/info")

    def has_volume(self, vid: str) -> bool:
        try:
            self.request("HEAD", f"/volumes/{vid}")
            return True
        except ServiceError as exc:
            if exc.status == 404:
                return False
            raise

    def upload_volume(self, array_kji: np.ndarray, geometry, is_2d: bool = False, modality: str | None = None) -> str:
        """Send a ``(K, J, I)`` volume on ``geometry`` once; returns its content-derived id (nothing
        is sent when the service already holds it)."""
        array = np.ascontiguousarray(array_kji)
        vid = volume_id(array, geometry, is_2d)
        if self.has_volume(vid):
            return vid
        frame = encode_frame([array], {"geometry": geometry_to_dict(geometry), "is_2d": bool(is_2d),
                                       "modality": modality, "volume_id": vid}, level=self.compression)
        return self._json("POST", "/volumes", frame)["volume_id"]

    def delete_volume(self, vid: str) -> None:
        self._json("DELETE", f"/volumes/{vid}")

    def focus(self, vid: str, axis: str | int, index: int, model: str | None = None, adapter: str | None = None,
              radius: int = 2) -> dict:
        """Embed slice ``index`` along ``axis`` (a name or voxel axis 0 = I, 1 = J, 2 = K) and
        ``radius`` neighbours each side ahead of a prompt, in the background."""
        body = {"axis": axis, "index": int(index), "radius": int(radius)}
        body.update({k: v for k, v in (("model", model), ("adapter", adapter)) if v is not None})
        return self._json("POST", f"/volumes/{vid}/focus", body)

    def prompt(self, vid: str, prompts, *, axis: str | int = "auto", model: str | None = None,
               adapter: str | None = None, box3d_strategy: str | None = None, propagate: bool | None = None,
               intensity: dict | None = None) -> PromptReply:
        """Segment from ``prompts`` (a :class:`~MedFMSegmentLib.prompts.Prompts` or its dict: box,
        points, negatives in voxel indices): a one-slice prompt answers with ``.mask``, others
        with ``.job_id``."""
        body = dict(prompts.to_dict() if hasattr(prompts, "to_dict") else prompts)
        body["axis"] = axis
        for key, value in (("model", model), ("adapter", adapter), ("box3d_strategy", box3d_strategy),
                           ("propagate", propagate), ("intensity", intensity)):
            if value is not None:
                body[key] = value
        status, _, data = self.request("POST", f"/volumes/{vid}/prompts", body)
        if status == 202:
            return PromptReply(job_id=json.loads(data)["job_id"])
        header, arrays = decode_frame(data)
        mask = _mask_from_frame(header, arrays)
        if header.get("kind") == "slice":
            return PromptReply(mask=mask, array_axis=int(header["array_axis"]), index=int(header["index"]),
                               plane=arrays[0])
        return PromptReply(mask=mask)

    def automatic(self, vid: str, adapter: str, keep_components: str | None = None) -> str:
        """Start prompt-free segmentation of a volume with ``adapter``; returns the job id."""
        body = {"adapter": adapter} | ({"keep_components": keep_components} if keep_components else {})
        return self._json("POST", f"/volumes/{vid}/automatic", body)["job_id"]

    def finetune(self, images: list, labels: list, config: dict) -> str:
        """Start fine-tuning a new adapter (``config["name"]``) on image/label pairs: volume ids, or
        :class:`~MedFMSegmentLib.io.MedicalImage` objects (uploaded first); returns the job id."""
        def ids(items: list) -> list[str]:
            return [item if isinstance(item, str) else self.upload_volume(item.array, item.geometry, item.is_2d)
                    for item in items]

        return self._json("POST", "/finetune", {"images": ids(images), "labels": ids(labels), "config": config})["job_id"]

    def job(self, job_id: str) -> JobStatus:
        data = self._json("GET", f"/jobs/{job_id}")
        return JobStatus(**{k: data[k] for k in JobStatus.__dataclass_fields__ if k in data})

    def updates(self, job_id: str, since: int = 0) -> tuple[int, list[tuple[int, int, np.ndarray]]]:
        """``(next cursor, [(array_axis, index, plane), ...])``: result slices written since ``since``
        (``array_axis``: numpy axis of the ``(K, J, I)`` mask). Replaying all of them in order on an
        empty mask gives the final result."""
        header, arrays = self._frame("GET", f"/jobs/{job_id}/updates", query={"since": int(since)})
        return int(header["next"]), [(int(a), int(i), plane) for (a, i), plane in zip(header["slices"], arrays)]

    def reports(self, job_id: str, since: int = 0) -> tuple[int, list[dict]]:
        """``(next cursor, [report, ...])``: a job's progress reports since ``since``, each as the
        library gave it (fine-tuning: ``{"stage": "embedding", "done", "total"}``, then
        ``{"step", "steps", "loss", "val_dice"}`` per step), so a client can print every one."""
        data = self._json("GET", f"/jobs/{job_id}/reports", query={"since": int(since)})
        return int(data["next"]), list(data["reports"])

    def result(self, job_id: str):
        """A finished job's result: the ``(K, J, I)`` bool mask, or a dict (fine-tuning: the adapter)."""
        _, kind, data = self.request("GET", f"/jobs/{job_id}/result")
        if kind.startswith(MEDIA_TYPE):
            return _mask_from_frame(*decode_frame(data))
        return json.loads(data)

    def cancel(self, job_id: str) -> JobStatus:
        data = self._json("POST", f"/jobs/{job_id}/cancel")
        return JobStatus(**{k: data[k] for k in JobStatus.__dataclass_fields__ if k in data})

    def adapters(self) -> list[dict]:
        """Adapters of the service: ``{"name", "metadata"}`` each."""
        return self._json("GET", "/adapters")

    def download_adapter(self, name: str, folder: str | os.PathLike) -> Path:
        """Copy the service's adapter ``name`` into the new local folder ``folder`` (written atomically)."""
        from .archive import ArchiveError, unpack_adapter

        try:
            return unpack_adapter(self.request("GET", f"/adapters/{name}/archive")[2], folder)
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
        return json.loads(self.request("PUT", f"/adapters/{name or Path(folder).name}/archive", data)[2])

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
