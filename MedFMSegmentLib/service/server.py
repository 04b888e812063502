"""Running the inference service (uvicorn) on a socket it binds itself (``medfmsegment serve``).

The process binds its socket first (port 0 picks a free port), writes the bearer token to a
0600 file, and once uvicorn accepts connections prints exactly one JSON line on stdout,
``{"url": ..., "token_file": ..., "pid": ...}``, for the parent process to read; everything else
goes to stderr. SIGTERM and SIGINT cancel the jobs and end the process with exit code 0; with a
parent process id it also ends when that process is gone (Slicer starting its own service).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..models import DEFAULT_DEVICE, DEFAULT_MODEL
from .state import Limits

__all__ = ["DEFAULT_HOST", "LOG_LEVELS", "ServeSettings", "serve", "default_runtime_dir", "read_or_create_token",
           "is_loopback"]

log = logging.getLogger("medfmsegment.service")

#: This machine only: other machines reach the service through an SSH tunnel.
DEFAULT_HOST = "127.0.0.1"
#: uvicorn's log levels, most severe first.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: Python packages the server needs beyond the library's own (the extra ``medfmsegment[service]``).
SERVER_PACKAGES = ("fastapi", "uvicorn", "starlette", "pydantic")


@dataclass
class ServeSettings:
    """What :func:`serve` runs.

    ``models`` maps each served model's name to its checkpoint (None: LiteMedSAM's embedded
    weights); ``port`` 0 picks a free port; ``adapter_dir`` and ``token_file`` default to a
    per-user runtime folder; with ``parent_pid`` the service ends when that process does.
    """

    models: dict[str, str | None] = field(default_factory=lambda: {DEFAULT_MODEL: None})
    host: str = DEFAULT_HOST
    port: int = 0
    device: str = DEFAULT_DEVICE
    backend: str | None = None
    precision: str | None = None
    adapter_dir: str | os.PathLike | None = None
    token_file: str | os.PathLike | None = None
    parent_pid: int | None = None
    limits: Limits = field(default_factory=Limits)
    log_level: str = "warning"


def default_runtime_dir() -> Path:
    """A per-user folder for the token file and, by default, adapters: ``$XDG_RUNTIME_DIR/medfmsegment``
    or ``<temp>/medfmsegment-<uid>``, created 0700."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    folder = Path(base) / "medfmsegment" if base else Path(tempfile.gettempdir()) / f"medfmsegment-{uid}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def read_or_create_token(path: Path) -> tuple[str, bool]:
    """``(token, created)``: the token in ``path`` if it exists, else a new random one written there 0600."""
    if path.exists():
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read token file {path}: {exc}") from None
        if len(token) < 16:
            raise InputError(f"token file {path} holds no token of 16 characters or more")
        if os.name == "posix" and path.stat().st_mode & 0o077:
            print(f"medfmsegment serve: warning: token file {path} is readable by other users", file=sys.stderr)
        return token, False
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise InputError(f"cannot create token file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, with Nagle's algorithm off for every connection it accepts.

    asyncio sets TCP_NODELAY on a connection only when its socket's protocol is ``IPPROTO_TCP``
    (protocol 0 does not count), so the socket is made so, and the listening socket carries
    TCP_NODELAY too (Linux passes it on). Without it each answer uvicorn writes in two parts
    (headers, then body) waits for the client's delayed ACK: about 40 ms a request.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _watch_parent(pid: int, server, interval: float = 1.0) -> None:
    """Ask ``server`` to exit once process ``pid`` is gone (polled every ``interval`` seconds)."""
    from ..files import process_alive

    while not server.should_exit:
        if not process_alive(pid):
            print(f"medfmsegment serve: parent process {pid} is gone; stopping", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        time.sleep(interval)


def _import_server():
    """uvicorn and the app factory; a missing optional package is one line (InputError)."""
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in SERVER_PACKAGES:
            raise InputError(f"serve needs {exc.name.split('.')[0]}: pip install 'medfmsegment[service]'") from None
        raise
    return uvicorn, create_app


def serve(settings: ServeSettings) -> int:
    """Run the service until a signal or the parent's end; returns the exit code."""
    uvicorn, create_app = _import_server()
    from .jobs import JobManager
    from .state import FocusWorker, ServiceState

    if settings.log_level not in LOG_LEVELS:
        raise InputError(f"unknown log level {settings.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    if not is_loopback(settings.host):
        print(f"medfmsegment serve: warning: listening on {settings.host}, reachable from other machines; every "
              "request still needs the token (an SSH tunnel to a loopback service is safer)", file=sys.stderr)
    if settings.parent_pid is not None and settings.parent_pid <= 0:
        raise InputError(f"parent process id {settings.parent_pid} is not a process id")
    runtime = default_runtime_dir()
    adapter_dir = Path(settings.adapter_dir) if settings.adapter_dir else runtime / "adapters"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    token_path = Path(settings.token_file) if settings.token_file else runtime / f"token-{os.getpid()}"
    sock = _bind(settings.host, settings.port)
    token, created = read_or_create_token(token_path)
    state = ServiceState(dict(settings.models), adapter_dir, settings.device, settings.backend, settings.precision,
                         settings.limits)
    jobs = JobManager(state.turns)
    focus = FocusWorker(state.turns)
    app = create_app(state, jobs, focus, token)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    ready = {"url": f"http://{url_host}:{port}", "token_file": str(token_path.resolve()), "pid": os.getpid()}

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                sys.stdout.write(json.dumps(ready) + "\n")
                sys.stdout.flush()

        async def shutdown(self, sockets=None) -> None:
            await asyncio_to_thread(jobs.shutdown, 30.0)
            focus.stop()
            await super().shutdown(sockets)

        def handle_exit(self, sig, frame) -> None:
            # Stop without re-raising the signal afterwards: a clean stop exits 0.
            if self.should_exit and sig == 2:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=10, limit_concurrency=256)
    server = Server(config)
    if settings.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(settings.parent_pid, server), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if created and not settings.token_file:  # a token file the user named is theirs: it stays for the next start
            token_path.unlink(missing_ok=True)
    return 0


async def asyncio_to_thread(function, *args):
    import asyncio

    return await asyncio.to_thread(function, *args)
