"""The prompt controller's HTTP exchanges in Slicer, through ``qt.QNetworkAccessManager``.

The library's :class:`~MedFMSegmentLib.slicer_bridge.transport.HttpTransport` builds each request
and reads each answer; this class only moves bytes. A request returns at once and its answer
comes from Qt's event loop (the manager's ``finished(QNetworkReply*)`` signal), so no prompt or
focus request ever blocks Slicer's main thread.
"""

from __future__ import annotations

from typing import Callable

import qt

__all__ = ["QtExchange"]


class QtExchange:
    """``exchange(request, on_response)`` for ``HttpTransport`` over one QNetworkAccessManager.

    Args:
        url: The service's address (``http://host:port``).
        token: The bearer token.
        timeout_ms: A request with no data moving for this long ends as unreachable.
    """

    def __init__(self, url: str, token: str | None, timeout_ms: int = 30000) -> None:
        self.url, self.token, self.timeout_ms = url.rstrip("/"), token or "", timeout_ms
        self.manager = qt.QNetworkAccessManager()
        self.manager.connect("finished(QNetworkReply*)", self._onFinished)
        self._waiting: dict = {}  # reply -> on_response
        self._closed = False

    def __call__(self, request, onResponse: Callable) -> None:
        if self._closed:  # a task still running on a closed connection ends now, never reaches a service
            onResponse(0, "", b"", f"the connection to {self.url} was closed")
            return
        networkRequest = qt.QNetworkRequest(qt.QUrl(self.url + request.target))
        networkRequest.setRawHeader(b"Authorization", f"Bearer {self.token}".encode())
        if hasattr(networkRequest, "setTransferTimeout"):  # Qt >= 5.15; older wrappers lack it
            networkRequest.setTransferTimeout(self.timeout_ms)
        if request.method == "GET":
            reply = self.manager.get(networkRequest)
        elif request.method == "HEAD":
            reply = self.manager.head(networkRequest)
        else:
            networkRequest.setRawHeader(b"Content-Type", (request.content_type or "application/json").encode())
            reply = self.manager.post(networkRequest, request.body or b"")
        self._waiting[reply] = onResponse

    def _onFinished(self, reply) -> None:
        onResponse = self._waiting.pop(reply, None)
        status = reply.attribute(qt.QNetworkRequest.HttpStatusCodeAttribute)  # None: no HTTP answer
        contentType = reply.rawHeader(b"Content-Type").data().decode("latin-1")
        data = reply.readAll().data()
        reason = "" if status else f"cannot reach the service at {self.url}: {reply.errorString()}"
        reply.deleteLater()
        if onResponse is not None:
            onResponse(int(status or 0), contentType, data, reason)

    def close(self) -> None:
        """Abort what is still in flight; each waiting task hears that no answer will come (status
        0), so none waits for good; later requests are answered the same way at once."""
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        for reply, onResponse in waiting.items():
            reply.abort()
            reply.deleteLater()
            onResponse(0, "", b"", f"the connection to {self.url} was closed")
