"""``medfmsegment serve``: run the inference service (uvicorn) on a socket it binds itself.

The process binds its socket first (``--port 0`` picks a free port), writes the bearer token to a
0600 file, and once uvicorn accepts connections prints exactly one JSON line on stdout,
``{"url": ..., "token_file": ..., "pid": ...}``, for the parent process to read; everything else
goes to stderr. SIGTERM and SIGINT cancel the jobs and end the process with exit code 0; with
``--parent-pid`` it also ends when that process is gone (Slicer starting its own service).
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

from ..errors import InputError

__all__ = ["register_cli", "serve", "default_runtime_dir", "read_or_create_token", "is_loopback"]

log = logging.getLogger("medfmsegment.service")


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
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def serve(args: argparse.Namespace) -> int:
    """Run the service until a signal or the parent's end; returns the exit code."""
    import uvicorn

    from .app import create_app
    from .jobs import JobManager
    from .state import FocusWorker, Limits, ServiceState

    models = _model_specs(args.model, args.checkpoint)
    if not is_loopback(args.host):
        print(f"medfmsegment serve: warning: listening on {args.host}, reachable from other machines; every "
              "request still needs the token (an SSH tunnel to a loopback service is safer)", file=sys.stderr)
    if args.parent_pid is not None and args.parent_pid <= 0:
        raise InputError("--parent-pid must be a process id")
    runtime = default_runtime_dir()
    adapter_dir = Path(args.adapter_dir) if args.adapter_dir else runtime / "adapters"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    token_path = Path(args.token_file) if args.token_file else runtime / f"token-{os.getpid()}"
    sock = _bind(args.host, args.port)
    token, created = read_or_create_token(token_path)
    mb = 1 << 20
    limits = Limits(max_upload_bytes=args.max_upload_mb * mb, max_volume_bytes=args.max_volume_mb * mb,
                    volume_memory_bytes=args.volume_memory_mb * mb)
    state = ServiceState(models, adapter_dir, args.device, args.backend, args.precision, limits)
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

    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=10, limit_concurrency=256)
    server = Server(config)
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, server), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if created and not args.token_file:  # a token file the user named is theirs: it stays for the next start
            token_path.unlink(missing_ok=True)
    return 0


async def asyncio_to_thread(function, *args):
    import asyncio

    return await asyncio.to_thread(function, *args)


def _model_specs(names: list[str] | None, checkpoints: list[str] | None) -> dict[str, str | None]:
    """``--model NAME [--checkpoint PATH]`` pairs, in order; LiteMedSAM (embedded) by default."""
    from ..models import DEFAULT_MODEL, MODEL_SPECS

    names, checkpoints = names or [DEFAULT_MODEL], checkpoints or []
    if len(checkpoints) > len(names):
        raise InputError("every --checkpoint follows its --model")
    specs: dict[str, str | None] = {}
    for n, name in enumerate(names):
        if name not in MODEL_SPECS:
            raise InputError(f"unknown model {name!r}: use one of {', '.join(sorted(MODEL_SPECS))}")
        checkpoint = checkpoints[n] if n < len(checkpoints) else None
        if MODEL_SPECS[name].needs_checkpoint and checkpoint is None:
            raise InputError(f"model {name} needs --checkpoint PATH after it")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise InputError(f"checkpoint {checkpoint} does not exist")
        specs[name] = checkpoint
    return specs


def register_cli(subparsers) -> None:
    """Add the ``serve`` subcommand."""
    from ..cli import add_backend_option

    parser = subparsers.add_parser("serve", help="run the inference service (HTTP, bearer token)",
                                   description="Serve models, adapters and jobs over HTTP on HOST:PORT. Prints one "
                                               "JSON line {url, token_file, pid} on stdout when ready; logs on "
                                               "stderr.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed when ready)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--model", action="append", help="model to serve (repeatable; default litemedsam)")
    parser.add_argument("--checkpoint", action="append", help="weights of the preceding --model")
    parser.add_argument("--adapter-dir", help="folder of the adapters clients may name (fine-tuning writes there; "
                                              "default: a per-user runtime folder)")
    parser.add_argument("--token-file", help="bearer token file: read if it exists, else created 0600 "
                                             "(default: a new file in a per-user runtime folder)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process ends")
    parser.add_argument("--max-upload-mb", type=int, default=2048, help="largest request body (default 2048)")
    parser.add_argument("--max-volume-mb", type=int, default=4096, help="largest uploaded volume (default 4096)")
    parser.add_argument("--volume-memory-mb", type=int, default=16384,
                        help="memory for volumes kept; least recently used dropped beyond (default 16384)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    add_backend_option(parser)
    parser.set_defaults(handler=serve)
