"""The module's logic: one inference service connection shared by the panel and the Segment Editor effect.

Inference never runs in Slicer's process. The logic starts ``medfmsegment serve`` with Slicer's
Python (:class:`~MedFMSegmentHelpers.service_process.ServiceProcess`) or connects to a remote
service (URL + token), and hands out the :class:`ServiceClient` (short panel requests, job polls)
and prompt controllers (:class:`MedFMSegmentLib.slicer_bridge.interaction.PromptController`),
whose requests go through Qt's non-blocking network access (:class:`~MedFMSegmentHelpers.network.QtExchange`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .network import QtExchange
from .parameters import MedFMSegmentParameterNode
from .process_tools import serve_command
from .settings import ensure_library_on_path
from .service_process import ServiceProcess

__all__ = ["MedFMSegmentLogic"]

class MedFMSegmentLogic(ScriptedLoadableModuleLogic):
    """Service connection, prompt controllers and the parameter node; no GUI.

    ``MedFMSegmentLogic.shared()`` is the instance the panel and the effect share.
    """

    _shared: Optional["MedFMSegmentLogic"] = None

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ensure_library_on_path()
        self.client = None
        self.transport = None  # the prompt controllers' non-blocking transport to the same service
        self.serviceInfo: dict = {}
        self.process: Optional[ServiceProcess] = None
        self._tokenFile: Optional[Path] = None
        self.warmUpJob: Optional[str] = None
        self._listeners: list[Callable[[str], None]] = []

    @classmethod
    def shared(cls) -> "MedFMSegmentLogic":
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def getParameterNode(self):
        return MedFMSegmentParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ service
    def addListener(self, callback: Callable[[str], None]) -> None:
        """``callback(state_line)`` whenever the connection changes (ready, failed, stopped)."""
        if callback not in self._listeners:
            self._listeners.append(callback)

    def removeListener(self, callback) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self, text: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(text)
            except Exception as exc:  # noqa: BLE001 - a closed panel must not break the others
                logging.warning(f"MedFMSegment: listener failed: {exc}")

    def startLocalService(self, adapter_dir: Optional[str], device: str = "auto",
                          models: tuple = ()) -> None:
        """Start ``medfmsegment serve`` with Slicer's Python; the listeners hear when it is ready."""
        self.stopService()
        runtime = Path(slicer.app.temporaryPath) / "MedFMSegment"
        runtime.mkdir(parents=True, exist_ok=True)
        token_file = runtime / f"token-{os.getpid()}"
        self._tokenFile = token_file
        command = serve_command(sys.executable, os.getpid(), token_file, adapter_dir, device, models)
        environment = {"PYTHONUNBUFFERED": "1"}
        module_dir = Path(__file__).resolve().parent.parent
        # Installed extension: the library sits beside the module; source checkout: one folder up.
        for candidate in (module_dir, module_dir.parent):
            if (candidate / "MedFMSegmentLib").is_dir():
                environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(candidate), os.environ.get("PYTHONPATH")]))
                break
        self.process = ServiceProcess(self._onServiceReady, self._onServiceFailed)
        self.process.start(command, environment)
        self._notify("Starting the local service...")

    def _onServiceReady(self, ready: dict) -> None:
        from MedFMSegmentLib.service.client import ServiceClient, read_token

        try:
            self.client = ServiceClient(ready["url"], token=read_token(ready.get("token_file")))
            self.serviceInfo = self.client.info()
            self._makeTransport()
        except Exception as exc:  # noqa: BLE001 - shown as the service status
            self._onServiceFailed(f"the service started but does not answer: {exc}")
            return
        self._warmUp()
        self._notify(f"Local service ready at {ready['url']} ({self.describeInfo()}).")

    def _makeTransport(self) -> None:
        from MedFMSegmentLib.slicer_bridge.transport import HttpTransport

        exchange = QtExchange(self.client.url, self.client.token, timeout_ms=int(self.client.timeout * 1000))
        self.transport = HttpTransport(exchange, compression=self.client.compression)

    def _warmUp(self) -> None:
        """Load the model in the service now (a job), so the first prompt does not wait for it."""
        from MedFMSegmentLib.slicer_bridge.interaction import warm_up

        parameters = self.getParameterNode()
        self.warmUpJob = warm_up(self.client, parameters.modelName or None, parameters.adapterName or None)

    def _onServiceFailed(self, reason: str) -> None:
        self._closeTransport()
        self.client = None
        self.serviceInfo = {}
        self._notify(f"Service failed: {reason}")

    def connectRemote(self, url: str, token: Optional[str]) -> dict:
        """Connect to a running service; returns its info (raises ServiceError on failure)."""
        from MedFMSegmentLib.service.client import ServiceClient

        self.stopService()
        client = ServiceClient(url.strip(), token=(token or "").strip() or None)
        info = client.info()
        self.client, self.serviceInfo = client, info
        self._makeTransport()
        self._warmUp()
        self._notify(f"Connected to {url} ({self.describeInfo()}).")
        return info

    def testConnection(self) -> str:
        """One line describing the service, or why it cannot be reached."""
        if self.client is None:
            return "Not connected."
        try:
            self.serviceInfo = self.client.info()
        except Exception as exc:  # noqa: BLE001 - the answer is the message
            return f"Not reachable: {exc}"
        return f"OK: {self.describeInfo()}"

    def describeInfo(self) -> str:
        info = self.serviceInfo or {}
        parts = [f"version {info.get('version', '?')}", f"device {info.get('device', '?')}"]
        if info.get("models"):
            parts.append("models " + ", ".join(str(m) for m in info["models"]))
        return "; ".join(parts)

    def stopService(self) -> None:
        """Stop the local service's process tree, or forget the remote connection; listeners (an
        active Segment Editor effect) hear of it, so none keeps a controller on a closed service."""
        wasRunning = self.process is not None or self.client is not None
        if self.process is not None:
            self.process.stop()
            self.process = None
        token_file, self._tokenFile = self._tokenFile, None
        if token_file is not None:
            Path(token_file).unlink(missing_ok=True)  # the local service's token dies with it
        self._closeTransport()
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
        self.client = None
        self.serviceInfo = {}
        if wasRunning:
            self._notify("Service stopped.")

    def _closeTransport(self) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.exchange.close()

    # ------------------------------------------------------------------ prompts
    def newController(self, status: Optional[Callable[[str], None]] = None):
        """A prompt controller talking to the current service (None when not connected)."""
        if self.transport is None:
            return None
        from MedFMSegmentLib.slicer_bridge.interaction import PromptController

        return PromptController(self.transport, status=status)

    @staticmethod
    def applyOptions(controller, parameterNode) -> None:
        """Copy model, adapter, axis and 3D strategy from the parameter node to a controller."""
        if controller is None or parameterNode is None:
            return
        options = controller.options
        options.model = parameterNode.modelName or None
        options.adapter = parameterNode.adapterName or None
        options.axis = parameterNode.axis
        options.box3d_strategy = parameterNode.box3dStrategy

    def adapters(self) -> list[dict]:
        """The service's adapters (name and metadata each); empty when not connected."""
        if self.client is None:
            return []
        try:
            return list(self.client.adapters())
        except Exception as exc:  # noqa: BLE001 - an empty list with a log line
            logging.warning(f"MedFMSegment: could not list adapters: {exc}")
            return []
