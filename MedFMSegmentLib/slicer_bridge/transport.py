"""How the prompt controller reaches the service without waiting for it: calls, transports, HTTP.

The controller never calls the service itself: it yields :class:`Call` objects (a verb of
:class:`~.writing.PromptRunner` and its arguments) and a :class:`Transport` answers each one
later through a callback, so nothing in Slicer's main thread waits on the network.

* :class:`RunnerTransport` runs a call at once on an object with the verbs (a stand-in in tests).
* :class:`HttpTransport` turns each call into HTTP exchanges (the verbs of
  :mod:`MedFMSegmentLib.service.protocol`, the ones
  :class:`~MedFMSegmentLib.service.client.ServiceClient` runs) and hands each exchange to an
  ``exchange(request, on_response)`` function:
  :class:`BlockingExchange` (``http.client`` through a ``ServiceClient``; tests and scripts) or,
  in Slicer, the module's ``QNetworkAccessManager`` exchange, whose answers arrive from Qt's
  event loop. ``on_response(status, content_type, data, reason)``: status 0 when unreachable,
  ``reason`` then saying why in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Protocol

from ..service.protocol import VERBS, HttpRequest, Response, Steps, checked

__all__ = ["Call", "Transport", "RunnerTransport", "HttpRequest", "HttpTransport", "BlockingExchange", "VERBS"]

Done = Callable[[Any, "BaseException | None"], None]  # (result, error): exactly one of them is set


@dataclass
class Call:
    """One service verb (``upload_volume``, ``prompt``, ``focus``, ``job``, ``updates``,
    ``result``, ``cancel``, ``automatic``, ``finetune``) with its arguments."""

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
        uploads = call.verb in ("upload_volume", "finetune")
        kwargs = dict(call.kwargs, compression=self.compression) if uploads else call.kwargs
        try:
            steps = checked(VERBS[call.verb](*call.args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - a bad call is the caller's error
            done(None, exc)
            return
        self._step(steps, None, done)

    def _step(self, steps: Steps, response: Response | None, done: Done) -> None:
        try:
            request = next(steps) if response is None else steps.send(response)
        except StopIteration as stop:
            done(stop.value, None)
            return
        except Exception as exc:  # noqa: BLE001 - ServiceError and malformed answers go to the caller
            done(None, exc)
            return

        def on_response(status: int, content_type: str, data: bytes, reason: str = "") -> None:
            self._step(steps, Response(int(status or 0), content_type or "", data or b"", reason), done)

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
        response = self.client.exchange(request)
        on_response(response.status, response.content_type, response.data, response.reason)


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
