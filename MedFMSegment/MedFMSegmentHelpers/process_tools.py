"""Qt-free helpers of the local service process: its command line, its ready line, killing its tree.

``sys.executable`` inside Slicer is PythonSlicer, a launcher that starts the real Python as a
child: ``QProcess.kill()`` stops only the launcher. The service prints its own pid in its ready
line, and :func:`kill_tree` ends that process and its children (psutil when installed, else
signals), then the launcher.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Sequence

__all__ = ["LineBuffer", "parse_ready_line", "serve_command", "kill_tree"]


class LineBuffer:
    """Collects output chunks and hands back complete lines only (a chunk may end mid-line)."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self._pending = ""
        self.limit = limit

    def feed(self, chunk: str) -> list[str]:
        """Add a chunk; returns the lines it completed (without their newline)."""
        text = self._pending + chunk
        *lines, self._pending = text.split("\n")
        if len(self._pending) > self.limit:  # a runaway line: hand it over rather than grow forever
            lines.append(self._pending)
            self._pending = ""
        return [line.rstrip("\r") for line in lines]

    def flush(self) -> list[str]:
        """The unfinished last line, if any (the process ended)."""
        rest, self._pending = self._pending, ""
        return [rest.rstrip("\r")] if rest.strip() else []


def parse_ready_line(line: str) -> dict | None:
    """``{"url", "token_file", "pid"}`` from the service's ready line, or None for other output."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or not isinstance(data.get("pid"), int):
        return None
    return data


def serve_command(python: str, parent_pid: int, token_file: str | Path, adapter_dir: str | None = None,
                  device: str = "auto", models: Sequence[tuple[str, str | None]] = ()) -> list[str]:
    """The ``medfmsegment serve`` command run with Slicer's Python, on a free loopback port."""
    args = [python, "-m", "MedFMSegmentLib.cli", "serve", "--host", "127.0.0.1", "--port", "0",
            "--parent-pid", str(int(parent_pid)), "--token-file", str(token_file), "--device", device]
    if adapter_dir:
        args += ["--adapter-dir", str(adapter_dir)]
    # serve pairs the n-th --checkpoint with the n-th --model: models with weights go first.
    ordered = sorted(models, key=lambda item: item[1] is None)
    for name, checkpoint in ordered:
        args += ["--model", name] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
    return args


def kill_tree(pid: int, timeout: float = 5.0) -> list[int]:
    """End process ``pid`` and all its descendants; returns the pids signalled.

    SIGTERM first (the service stops its jobs cleanly), SIGKILL for what is left after ``timeout``.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is None:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return []
        return [pid]
    try:
        root = psutil.Process(pid)
        processes = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return []
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in processes]
