"""``medfmsegment serve``: the inference service over HTTP (:mod:`MedFMSegmentLib.service.server`).

fastapi and uvicorn (``pip install 'medfmsegment[service]'``) are imported when the service
starts; a missing one is one line and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import InputError
from .options import add_backend_options, add_device_option

if TYPE_CHECKING:
    from ..service.server import ServeSettings

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "models_from_args", "settings_from_args"]

HELP = "run the inference service (HTTP, bearer token)"
DESCRIPTION = ("Serve models, adapters and jobs over HTTP on HOST:PORT. Prints one JSON line {url, token_file, pid} on "
               "stdout when ready; logs on stderr.")
_MB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models import DEFAULT_MODEL, MODEL_SPECS
    from ..service.server import LOG_LEVELS, ServeSettings, is_loopback
    from ..service.state import Limits

    defaults, limits = ServeSettings(), Limits()
    parser.add_argument("--host", default=defaults.host,
                        help=f"address to listen on (default {defaults.host}"
                             f"{', this machine only' if is_loopback(defaults.host) else ''})")
    parser.add_argument("--port", type=int, default=defaults.port,
                        help=f"port (default {defaults.port}: a free one, printed when ready)")
    add_device_option(parser)
    parser.add_argument("--model", action="append", choices=list(MODEL_SPECS),
                        help=f"model to serve (repeatable; default {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", action="append", help="weights of the preceding --model")
    parser.add_argument("--adapter-dir", help="folder of the adapters clients may name (fine-tuning writes there; "
                                              "default: a per-user runtime folder)")
    parser.add_argument("--token-file", help="bearer token file: read if it exists, else created 0600 "
                                             "(default: a new file in a per-user runtime folder)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process ends")
    parser.add_argument("--max-upload-mb", type=int, default=limits.max_upload_bytes // _MB,
                        help=f"largest request body (default {limits.max_upload_bytes // _MB})")
    parser.add_argument("--max-volume-mb", type=int, default=limits.max_volume_bytes // _MB,
                        help=f"largest uploaded volume (default {limits.max_volume_bytes // _MB})")
    parser.add_argument("--volume-memory-mb", type=int, default=limits.volume_memory_bytes // _MB,
                        help="memory for volumes kept; least recently used dropped beyond "
                             f"(default {limits.volume_memory_bytes // _MB})")
    parser.add_argument("--log-level", default=defaults.log_level, choices=list(LOG_LEVELS),
                        help=f"server log level on stderr (default {defaults.log_level})")
    add_backend_options(parser)


def models_from_args(names: list[str] | None, checkpoints: list[str] | None) -> dict[str, str | None]:
    """``--model NAME [--checkpoint PATH]`` pairs, in order; LiteMedSAM (embedded) by default."""
    from ..models import DEFAULT_MODEL, MODEL_SPECS

    names, checkpoints = names or [DEFAULT_MODEL], checkpoints or []
    if len(checkpoints) > len(names):
        raise InputError("every --checkpoint follows its --model")
    specs: dict[str, str | None] = {}
    for n, name in enumerate(names):
        if name not in MODEL_SPECS:
            raise InputError(f"unknown model {name!r}: use one of {', '.join(MODEL_SPECS)}")
        checkpoint = checkpoints[n] if n < len(checkpoints) else None
        if MODEL_SPECS[name].needs_checkpoint and checkpoint is None:
            raise InputError(f"model {name} needs --checkpoint PATH after it")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise InputError(f"checkpoint {checkpoint} does not exist")
        specs[name] = checkpoint
    return specs


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    from ..service.server import ServeSettings
    from ..service.state import Limits

    models = models_from_args(args.model, args.checkpoint)
    if args.parent_pid is not None and args.parent_pid <= 0:
        raise InputError("--parent-pid must be a process id")
    limits = Limits(max_upload_bytes=args.max_upload_mb * _MB, max_volume_bytes=args.max_volume_mb * _MB,
                    volume_memory_bytes=args.volume_memory_mb * _MB)
    return ServeSettings(models=models, host=args.host, port=args.port, device=args.device, backend=args.backend,
                         precision=args.precision, adapter_dir=args.adapter_dir, token_file=args.token_file,
                         parent_pid=args.parent_pid, limits=limits, log_level=args.log_level)


def run(args: argparse.Namespace) -> int:
    from ..service.server import serve

    return serve(settings_from_args(args))
