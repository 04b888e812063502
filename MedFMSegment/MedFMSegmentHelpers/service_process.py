"""The local inference service as a QProcess.

No Python thread runs in Slicer (PythonQt holds the GIL while Qt idles): the process's output
arrives through QProcess signals on the main thread (service jobs are polled by the panel's tasks,
:mod:`.tasks`).
"""

from __future__ import annotations

import logging
from typing import Callable

import qt

from .process_tools import LineBuffer, kill_tree, parse_ready_line

__all__ = ["ServiceProcess"]


class ServiceProcess:
    """Runs ``medfmsegment serve`` and reads its JSON ready line.

    Args:
        on_ready: Called with the ready line's dict (``url``, ``token_file``, ``pid``).
        on_failed: Called with a one-line reason: failed start, early exit, or no ready line in time.
        startup_timeout_s: Seconds to wait for the ready line.
    """

    def __init__(self, on_ready: Callable[[dict], None], on_failed: Callable[[str], None],
                 startup_timeout_s: float = 300.0) -> None:
        self.on_ready, self.on_failed = on_ready, on_failed
        self.process: qt.QProcess | None = None
        # The last stopped or failed QProcess, kept referenced: dropping the only reference inside
        # one of its own signals would make PythonQt delete it while Qt still uses it.
        self._retired: qt.QProcess | None = None
        self.ready: dict | None = None
        self.log: list[str] = []
        self._stdout, self._stderr = LineBuffer(), LineBuffer()
        self._timer = qt.QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(startup_timeout_s * 1000))
        self._timer.connect("timeout()", self._on_timeout)

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, command: list[str], environment: dict[str, str]) -> None:
        """Start the service (stopping a previous one first)."""
        self.stop()
        self.ready, self.log = None, []
        self._stdout, self._stderr = LineBuffer(), LineBuffer()
        process = qt.QProcess()
        env = qt.QProcessEnvironment.systemEnvironment()
        for key, value in environment.items():
            env.insert(key, value)
        process.setProcessEnvironment(env)
        process.connect("readyReadStandardOutput()", self._on_stdout)
        process.connect("readyReadStandardError()", self._on_stderr)
        process.connect("errorOccurred(QProcess::ProcessError)", self._on_error)
        process.connect("finished(int,QProcess::ExitStatus)", self._on_finished)
        self.process = process
        self._timer.start()
        process.start(command[0], command[1:])

    def stop(self) -> None:
        """Stop the service: its real Python process tree (the ready line's pid), then the launcher."""
        self._timer.stop()
        process, self.process = self.process, None
        if process is not None:
            self._retired = process
        if self.ready and self.ready.get("pid"):
            kill_tree(int(self.ready["pid"]))
        if process is not None:
            process.disconnect("finished(int,QProcess::ExitStatus)", self._on_finished)
            process.disconnect("errorOccurred(QProcess::ProcessError)", self._on_error)
            pid = int(process.processId()) if process.state() != qt.QProcess.NotRunning else 0
            if pid:
                kill_tree(pid)
            process.waitForFinished(3000)
        self.ready = None

    def _read(self, data, buffer: LineBuffer) -> list[str]:
        lines = buffer.feed(bytes(data).decode("utf-8", errors="replace"))
        self.log.extend(lines)
        del self.log[:-200]
        return lines

    def _on_stdout(self) -> None:
        if self.process is None:  # output of a process already stopped (e.g. while waiting for it)
            return
        for line in self._read(self.process.readAllStandardOutput().data(), self._stdout):
            ready = parse_ready_line(line) if self.ready is None else None
            if ready is not None:
                self._timer.stop()
                self.ready = ready
                self.on_ready(ready)
            else:
                logging.info(f"MedFMSegment service: {line}")

    def _on_stderr(self) -> None:
        if self.process is None:
            return
        for line in self._read(self.process.readAllStandardError().data(), self._stderr):
            logging.info(f"MedFMSegment service: {line}")

    def _last_line(self) -> str:
        return next((line for line in reversed(self.log) if line.strip()), "")

    def _fail(self, reason: str) -> None:
        self._timer.stop()
        if self.process is not None:
            self._retired = self.process  # called from the process's own signal: keep it alive
        self.process = None
        self.ready = None
        self.on_failed(reason)

    def _on_error(self, error) -> None:
        if error == qt.QProcess.FailedToStart:  # no finished() follows a failed start
            self._fail("the service could not start (is Slicer's Python at its usual place?)")

    def _on_finished(self, exit_code: int, exit_status=None) -> None:
        self._fail(f"the service stopped (exit code {exit_code}): {self._last_line()}")

    def _on_timeout(self) -> None:
        self.stop()
        self.on_failed("the service printed no ready line in time: " + self._last_line())
