"""The service's HTTP protocol, sans I/O: each verb as the requests it sends and how it reads the answers.

A verb is a generator that yields :class:`HttpRequest` objects and is sent each answer as a
:class:`Response`; its return value is the verb's result. Whoever moves the bytes runs it:
:class:`~.client.ServiceClient` over ``http.client`` (blocking), the Slicer module over
``QNetworkAccessManager`` (answers from Qt's event loop). So the request bodies and the parsing
of answers exist once. :func:`checked` raises each refused request into the verb as
:class:`ServiceError` (a HEAD's 404 is an answer: "not there").
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import numpy as np

from ..geometry import slice_into_volume, voxel_axis_of
from .wire import MEDIA_TYPE, WireError, decode_frame, encode_frame, geometry_to_dict, volume_id

__all__ = ["API", "ServiceError", "PromptReply", "JobStatus", "HttpRequest", "Response", "Steps", "checked",
           "VERBS"]

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


@dataclass
class HttpRequest:
    """One HTTP request to the service: ``target`` is the path with the API prefix and query;
    the body is ``json`` or binary ``frame`` (a frame, an adapter archive) or none."""

    method: str
    path: str
    json: dict | None = None
    frame: bytes | None = None
    query: dict | None = None

    @property
    def target(self) -> str:
        return API + self.path + ("?" + urllib.parse.urlencode(self.query) if self.query else "")

    @property
    def body(self) -> bytes | None:
        return json.dumps(self.json).encode() if self.json is not None else self.frame

    @property
    def content_type(self) -> str | None:
        return "application/json" if self.json is not None else MEDIA_TYPE if self.frame is not None else None


@dataclass
class Response:
    """One answer: ``status`` 0 when the service could not be reached (``reason`` says why)."""

    status: int
    content_type: str
    data: bytes
    reason: str = ""

    def json(self) -> Any:
        return json.loads(self.data or b"null")

    def frame(self) -> tuple[dict, list]:
        try:
            return decode_frame(self.data)
        except WireError as exc:
            raise ServiceError(0, f"malformed answer from the service: {exc}") from None

    def error(self) -> ServiceError:
        if self.status == 0:
            return ServiceError(0, self.reason or "cannot reach the service")
        try:
            message = str(json.loads(self.data)["error"])
        except (ValueError, KeyError, TypeError):
            message = self.data[:200].decode("utf-8", "replace").strip() or self.reason or f"HTTP {self.status}"
        return ServiceError(self.status, message)


Steps = Generator[HttpRequest, Response, Any]


def checked(steps: Steps) -> Steps:
    """``steps`` with each non-2xx answer raised into it as :class:`ServiceError` (HEAD 404: passed on)."""
    request = next(steps)
    while True:
        response = yield request
        try:
            if 200 <= response.status < 300 or (request.method == "HEAD" and response.status == 404):
                request = steps.send(response)
            else:
                request = steps.throw(response.error())
        except StopIteration as stop:
            return stop.value


def mask_from_frame(header: dict, arrays: list) -> np.ndarray:
    """The ``(K, J, I)`` bool mask of a result frame (a ``slice`` frame: one plane placed in an empty mask)."""
    if header.get("kind") != "slice":
        return arrays[0].astype(bool, copy=False)
    mask = np.zeros(tuple(header["shape"]), bool)
    slice_into_volume(mask, voxel_axis_of(int(header["array_axis"])), int(header["index"]), arrays[0])
    return mask


def _given(body: dict, **options) -> dict:
    return body | {key: value for key, value in options.items() if value is not None}


def _job_status(data: dict) -> JobStatus:
    return JobStatus(**{k: data[k] for k in JobStatus.__dataclass_fields__ if k in data})


# ---------------------------------------------------------------------------- volumes and prompts
def info() -> Steps:
    return (yield HttpRequest("GET", "/info")).json()


def has_volume(vid: str) -> Steps:
    return (yield HttpRequest("HEAD", f"/volumes/{vid}")).status != 404


def upload_volume(array_kji, geometry, is_2d: bool = False, modality: str | None = None,
                  compression: int = 0) -> Steps:
    array = np.ascontiguousarray(array_kji)
    vid = volume_id(array, geometry, is_2d)
    if (yield from has_volume(vid)):
        return vid  # the service holds it already: nothing is sent
    frame = encode_frame([array], {"geometry": geometry_to_dict(geometry), "is_2d": bool(is_2d), "modality": modality,
                                   "volume_id": vid}, level=compression)
    return (yield HttpRequest("POST", "/volumes", frame=frame)).json()["volume_id"]


def delete_volume(vid: str) -> Steps:
    yield HttpRequest("DELETE", f"/volumes/{vid}")


def focus(vid: str, axis, index: int, model=None, adapter=None, radius: int = 2) -> Steps:
    body = _given({"axis": axis, "index": int(index), "radius": int(radius)}, model=model, adapter=adapter)
    return (yield HttpRequest("POST", f"/volumes/{vid}/focus", json=body)).json()


def prompt(vid: str, prompts, *, axis="auto", model=None, adapter=None, box3d_strategy=None, propagate=None,
           intensity=None) -> Steps:
    body = _given(dict(prompts.to_dict() if hasattr(prompts, "to_dict") else prompts, axis=axis), model=model,
                  adapter=adapter, box3d_strategy=box3d_strategy, propagate=propagate, intensity=intensity)
    response = yield HttpRequest("POST", f"/volumes/{vid}/prompts", json=body)
    if response.status == 202:
        return PromptReply(job_id=response.json()["job_id"])
    header, arrays = response.frame()
    if header.get("kind") != "slice":
        return PromptReply(mask=mask_from_frame(header, arrays))
    return PromptReply(mask=mask_from_frame(header, arrays), array_axis=int(header["array_axis"]),
                       index=int(header["index"]), plane=arrays[0])


def automatic(vid: str, adapter: str, keep_components: str | None = None) -> Steps:
    body = _given({"adapter": adapter}, keep_components=keep_components or None)
    return (yield HttpRequest("POST", f"/volumes/{vid}/automatic", json=body)).json()["job_id"]


def finetune(images: list, labels: list, config: dict, compression: int = 0) -> Steps:
    def ids(items: list) -> Steps:  # volume ids; images are uploaded first
        found = []
        for item in items:
            found.append(item if isinstance(item, str) else
                         (yield from upload_volume(item.array, item.geometry, item.is_2d, compression=compression)))
        return found

    body = {"images": (yield from ids(images)), "labels": (yield from ids(labels)), "config": config}
    return (yield HttpRequest("POST", "/finetune", json=body)).json()["job_id"]


# ---------------------------------------------------------------------------- jobs and adapters
def job(job_id: str) -> Steps:
    return _job_status((yield HttpRequest("GET", f"/jobs/{job_id}")).json())


def updates(job_id: str, since: int = 0) -> Steps:
    header, arrays = (yield HttpRequest("GET", f"/jobs/{job_id}/updates", query={"since": int(since)})).frame()
    return int(header["next"]), [(int(a), int(i), plane) for (a, i), plane in zip(header["slices"], arrays)]


def reports(job_id: str, since: int = 0) -> Steps:
    data = (yield HttpRequest("GET", f"/jobs/{job_id}/reports", query={"since": int(since)})).json()
    return int(data["next"]), list(data["reports"])


def result(job_id: str) -> Steps:
    response = yield HttpRequest("GET", f"/jobs/{job_id}/result")
    if not response.content_type.startswith(MEDIA_TYPE):
        return response.json()
    return mask_from_frame(*response.frame())


def cancel(job_id: str) -> Steps:
    return _job_status((yield HttpRequest("POST", f"/jobs/{job_id}/cancel")).json())


def adapters() -> Steps:
    return (yield HttpRequest("GET", "/adapters")).json()


def adapter_archive(name: str) -> Steps:
    return (yield HttpRequest("GET", f"/adapters/{name}/archive")).data


def upload_adapter_archive(name: str, archive: bytes) -> Steps:
    return (yield HttpRequest("PUT", f"/adapters/{name}/archive", frame=archive)).json()


# The verbs the Slicer module sends without waiting (prompts and jobs; ``compression`` where they upload).
VERBS: dict[str, Callable[..., Steps]] = {"upload_volume": upload_volume, "prompt": prompt, "focus": focus,
                                          "job": job, "updates": updates, "result": result, "cancel": cancel,
                                          "automatic": automatic, "finetune": finetune}
