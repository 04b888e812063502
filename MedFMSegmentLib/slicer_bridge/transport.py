"""How the prompt controller reaches the service without waiting for it: calls, transports, HTTP.

The controller never calls the service itself: it yields :class:`Call` objects (a verb of
:class:`~.writing.PromptRunner` and its arguments) and a :class:`Transport` answers each one
later through a callback, so nothing in Slicer's main thread waits on the network.

* :class:`RunnerTransport` runs a call at once on an object with the verbs (a stand-in in tests).
* :class:`HttpTransport` turns each call into HTTP exchanges (:data:`VERBS`: request bodies as the
  service reads them, answers parsed as :class:`~MedFMSegmentLib.service.client.ServiceClient`
  parses them) and hands each exchange to an ``exchange(request, on_response)`` function:
  :class:`BlockingExchange` (``http.client`` through a ``ServiceClient``; tests and scripts) or,
  in Slicer, the module's ``QNetworkAccessManager`` exchange, whose answers arrive from Qt's
  event loop. ``on_response(status, content_type, data, reason)``: status 0 when unreachable,
  ``reason`` then saying why in one line.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Protocol

import numpy as np

from ..geometry import slice_into_volume, voxel_axis_of
from ..service.client import API, JobStatus, PromptReply, ServiceError
from ..service.wire import MEDIA_TYPE, WireError, decode_frame, encode_frame, geometry_to_dict, volume_id

__all__ = ["Call", "Transport", "RunnerTransport", "HttpRequest", "HttpTransport", "BlockingExchange", "VERBS"]

Done = Callable[[Any, "BaseException | None"], None]  # (result, error): exactly one of them is set


@dataclass
class Call:
    """One service verb (``upload_volume``, ``prompt``, ``focus``, ``job``, ``updates``,
    ``result``, ``cancel``) with its arguments."""

    verb: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def call(verb: str, *args, **kwargs) -> Call:
    return Call(verb, args, kwargs)


class Transport(Protocol):
    """Sends a call; ``done(result, None)`` or ``done(None, error)`` follows, now or later."""

    def send(self, call: Call, done: Done) -> None: ...


class RunnerTransport:
    """Runs each call at once on ``runner`` (any object with the verbs' methods)."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def send(self, call: Call, done: Done) -> None:
        try:
            result = getattr(self.runner, call.verb)(*call.args, **call.kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            done(None, exc)
            return
        done(result, None)


@dataclass
class HttpRequest:
    """One HTTP request to the service: ``target`` is the path with the API prefix and query."""

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
class _Response:
    status: int  # 0: the service could not be reached (``reason`` says why)
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


Steps = Generator[HttpRequest, _Response, Any]


def _checked(steps: Steps) -> Steps:
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


def _mask(header: dict, arrays: list) -> np.ndarray:
    if header.get("kind") != "slice":
        return arrays[0].astype(bool, copy=False)
    mask = np.zeros(tuple(header["shape"]), bool)
    slice_into_volume(mask, voxel_axis_of(int(header["array_axis"])), int(header["index"]), arrays[0])
    return mask


# ---------------------------------------------------------------------------- the verbs as HTTP
def _upload_volume(array_kji, geometry, is_2d: bool = False, compression: int = 0) -> Steps:
    array = np.ascontiguousarray(array_kji)
    vid = volume_id(array, geometry, is_2d)
    if (yield HttpRequest("HEAD", f"/volumes/{vid}")).status != 404:
        return vid  # the service holds it already: nothing is sent
    frame = encode_frame([array], {"geometry": geometry_to_dict(geometry), "is_2d": bool(is_2d), "modality": None,
                                   "volume_id": vid}, level=compression)
    return (yield HttpRequest("POST", "/volumes", frame=frame)).json()["volume_id"]


def _prompt(vid: str, prompts, *, axis="auto", model=None, adapter=None, box3d_strategy=None, propagate=None) -> Steps:
    body = dict(prompts.to_dict(), axis=axis)
    body.update({k: v for k, v in (("model", model), ("adapter", adapter), ("box3d_strategy", box3d_strategy),
                                   ("propagate", propagate)) if v is not None})
    response = yield HttpRequest("POST", f"/volumes/{vid}/prompts", json=body)
    if response.status == 202:
        return PromptReply(job_id=response.json()["job_id"])
    header, arrays = response.frame()
    if header.get("kind") != "slice":
        return PromptReply(mask=_mask(header, arrays))
    return PromptReply(mask=_mask(header, arrays), array_axis=int(header["array_axis"]), index=int(header["index"]),
                       plane=arrays[0])


def _focus(vid: str, axis, index: int, model=None, adapter=None, radius: int = 2) -> Steps:
    body = {"axis": axis, "index": int(index), "radius": int(radius)}
    body.update({k: v for k, v in (("model", model), ("adapter", adapter)) if v is not None})
    return (yield HttpRequest("POST", f"/volumes/{vid}/focus", json=body)).json()


def _job_status(data: dict) -> JobStatus:
    return JobStatus(**{k: data[k] for k in JobStatus.__dataclass_fields__ if k in data})


def _job(job_id: str) -> Steps:
    return _job_status((yield HttpRequest("GET", f"/jobs/{job_id}")).json())


def _updates(job_id: str, since: int = 0) -> Steps:
    header, arrays = (yield HttpRequest("GET", f"/jobs/{job_id}/updates", query={"since": int(since)})).frame()
    return int(header["next"]), [(int(a), int(i), plane) for (a, i), plane in zip(header["slices"], arrays)]


def _result(job_id: str) -> Steps:
    response = yield HttpRequest("GET", f"/jobs/{job_id}/result")
    if not response.content_type.startswith(MEDIA_TYPE):
        return response.json()
    return _mask(*response.frame())


def _cancel(job_id: str) -> Steps:
    return _job_status((yield HttpRequest("POST", f"/jobs/{job_id}/cancel", json={})).json())


VERBS: dict[str, Callable[..., Steps]] = {"upload_volume": _upload_volume, "prompt": _prompt, "focus": _focus,
                                          "job": _job, "updates": _updates, "result": _result, "cancel": _cancel}


class HttpTransport:
    """Runs each call as its HTTP exchanges, one after the other, through ``exchange``.

    Args:
        exchange: ``exchange(request, on_response)``; ``on_response(status, content_type, data,
            reason)`` follows, now (:class:`BlockingExchange`) or from an event loop.
        compression: zlib level of volume uploads (0 on loopback, as the client chooses).
    """

    def __init__(self, exchange: Callable[[HttpRequest, Callable], None], compression: int = 0) -> None:
        self.exchange, self.compression = exchange, compression

    def send(self, call: Call, done: Done) -> None:
        kwargs = dict(call.kwargs, compression=self.compression) if call.verb == "upload_volume" else call.kwargs
        try:
            steps = _checked(VERBS[call.verb](*call.args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - a bad call is the caller's error
            done(None, exc)
            return
        self._step(steps, None, done)

    def _step(self, steps: Steps, response: _Response | None, done: Done) -> None:
        try:
            request = next(steps) if response is None else steps.send(response)
        except StopIteration as stop:
            done(stop.value, None)
            return
        except Exception as exc:  # noqa: BLE001 - ServiceError and malformed answers go to the caller
            done(None, exc)
            return

        def on_response(status: int, content_type: str, data: bytes, reason: str = "") -> None:
            self._step(steps, _Response(int(status or 0), content_type or "", data or b"", reason), done)

        try:
            self.exchange(request, on_response)
        except Exception as exc:  # noqa: BLE001 - a request that cannot be sent ends the call, never hangs it
            steps.close()
            done(None, exc)


class BlockingExchange:
    """Exchanges over a :class:`~MedFMSegmentLib.service.client.ServiceClient`'s connection,
    answering before it returns (tests, scripts; in Slicer the module's Qt exchange is used)."""

    def __init__(self, client) -> None:
        self.client = client

    def __call__(self, request: HttpRequest, on_response: Callable) -> None:
        body = request.json if request.json is not None else request.frame
        try:
            status, content_type, data = self.client.request(request.method, request.path, body, request.query)
        except ServiceError as exc:
            if exc.status == 0:
                on_response(0, "", b"", exc.message)
            else:
                on_response(exc.status, "application/json", json.dumps({"error": exc.message}).encode())
            return
        on_response(status, content_type, data)


def blocking_transport(client) -> HttpTransport:
    """The HTTP transport over ``client``'s own connection (the one tests and scripts use)."""
    return HttpTransport(BlockingExchange(client), compression=client.compression)


# ---------------------------------------------------------------------------- one task at a time
NEXT_POLL = object()  # yielded by a task: resume it at the next :meth:`TaskRunner.tick`


class TaskRunner:
    """Runs one task (a generator yielding :class:`Call` objects or :data:`NEXT_POLL`) at a time.

    Each call's result is sent back into the task (an error is raised into it) as soon as the
    transport answers, so a task reads as plain sequential code whether answers come at once or
    from Qt's event loop. A dropped task's late answers are ignored.

    Args:
        transport: Where calls go.
        on_end: Called with None when a task ends, or with the exception that ended it.
        on_late: Called with ``(call, result)`` when a dropped task's call is answered.
    """

    def __init__(self, transport: Transport, on_end: Callable[[BaseException | None], None],
                 on_late: Callable[[Call, Any], None] | None = None) -> None:
        self.transport, self.on_end, self.on_late = transport, on_end, on_late
        self.task: Generator | None = None
        self._waiting = False  # the task waits for the next tick

    @property
    def idle(self) -> bool:
        return self.task is None

    def start(self, task: Generator) -> None:
        self.drop()
        self.task, self._waiting = task, False
        self._resume(task, None, None)

    def tick(self) -> None:
        """Resume a task that waits for the next poll."""
        if self.task is not None and self._waiting:
            self._waiting = False
            self._resume(self.task, None, None)

    def drop(self) -> None:
        """Forget the running task (its answers still in flight are ignored)."""
        task, self.task, self._waiting = self.task, None, False
        if task is not None:
            try:
                task.close()
            except ValueError:  # it is running: it stops at its next answer
                pass

    def _resume(self, task: Generator, value: Any, error: BaseException | None, sent: Call | None = None) -> None:
        if task is not self.task:
            task.close()
            if sent is not None and error is None and self.on_late is not None:
                self.on_late(sent, value)
            return
        item, failure = None, None
        try:
            item = task.send(value) if error is None else task.throw(error)
        except StopIteration:
            item = StopIteration
        except Exception as exc:  # noqa: BLE001 - reported by the owner as a status line
            item, failure = StopIteration, exc
        if task is not self.task:  # dropped while it ran
            task.close()
            return
        if item is StopIteration:
            self.task = None
            self.on_end(failure)
        elif item is NEXT_POLL:
            self._waiting = True
        else:
            self.transport.send(item, lambda result, problem: self._resume(task, result, problem, item))
