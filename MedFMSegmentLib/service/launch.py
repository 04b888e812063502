"""Start a local ``medfmsegment serve`` child process from Python and connect to it.

For scripts and benchmarks (the Slicer module starts its own with QProcess the same way: read the
one JSON line, then the token file).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .client import ServiceClient, ServiceError

__all__ = ["LocalService", "start_local_service"]


@dataclass
class LocalService:
    """A running child service: its process, URL, token and a client on it."""

    process: subprocess.Popen
    url: str
    token: str
    token_file: str

    def client(self, timeout: float = 300.0) -> ServiceClient:
        return ServiceClient(self.url, self.token, timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (jobs are cancelled), then the exit code; killed if it outlives ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_local_service(*arguments: str, timeout: float = 300.0, stderr=None) -> LocalService:
    """Run ``python -m MedFMSegmentLib.cli serve ARGUMENTS...`` and wait for its ready line.

    ``stderr``: where its log goes (default: this process's stderr).
    """
    command = [sys.executable, "-m", "MedFMSegmentLib.cli", "serve", *arguments]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    line = process.stdout.readline() if selector.select(timeout) else b""
    selector.close()
    if not line:
        process.kill()
        raise ServiceError(0, f"the service did not start (exit code {process.wait()})")
    ready = json.loads(line)
    token = Path(ready["token_file"]).read_text(encoding="utf-8").strip()
    return LocalService(process, ready["url"], token, ready["token_file"])
