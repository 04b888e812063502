"""The ``medfmsegment`` command: the parser, built from one module per subcommand, and the error guard.

A subcommand's options are added the first time its parser is looked up (its name parsed, its
``--help``, ``choices[name]``): their defaults come from library modules that import torch, so
``medfmsegment --help`` and :func:`build_parser` import none of them.

Every subcommand turns user mistakes (:class:`~MedFMSegmentLib.errors.InputError`) into one line
on stderr and exit code 2, without a traceback and without leaving a partial output file.
Set ``MEDFMSEGMENT_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import MutableMapping
from types import ModuleType
from typing import Callable, Iterator, Sequence

from .. import __version__
from ..errors import CancelledError, InputError
from . import batch, demo, evaluate, finetune, info, segment, serve
from .options import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED

__all__ = ["COMMANDS", "build_parser", "entry_point", "main", "run_guarded"]

#: The subcommands, in the order ``--help`` lists them, each named after its module; each module has
#: ``HELP``, ``DESCRIPTION`` (None: none), ``add_arguments(parser)`` and ``run(args)``.
COMMANDS = (segment, info, demo, finetune, evaluate, batch, serve)


class _Parsers(MutableMapping):
    """Subcommand name -> parser; a parser gets its options when first looked up."""

    def __init__(self) -> None:
        self._parsers: dict[str, argparse.ArgumentParser] = {}
        self._pending: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def defer(self, name: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
        self._pending[name] = add_arguments

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        parser = self._parsers[name]
        add_arguments = self._pending.pop(name, None)
        if add_arguments is not None:
            add_arguments(parser)
        return parser

    def __setitem__(self, name: str, parser: argparse.ArgumentParser) -> None:
        self._parsers[name] = parser

    def __delitem__(self, name: str) -> None:
        del self._parsers[name]
        self._pending.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._parsers

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsers)

    def __len__(self) -> int:
        return len(self._parsers)


class _Subcommands(argparse._SubParsersAction):  # argparse's subparsers action, its parser map deferred
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._name_parser_map = self.choices = _Parsers()

    def add_command(self, module: ModuleType) -> None:
        name = module.__name__.rsplit(".", 1)[1]
        parser = self.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        parser.set_defaults(handler=module.run)
        self._name_parser_map.defer(name, module.add_arguments)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfmsegment",
                                     description="Promptable and few-shot adapted SAM-family segmentation of "
                                                 "medical images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_Subcommands)
    for command in COMMANDS:
        commands.add_command(command)
    return parser


def run_guarded(function: Callable[[], int]) -> int:
    """Run a command body, mapping errors to exit codes and one-line messages."""
    try:
        return function()
    except InputError as exc:
        print(f"medfmsegment: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, CancelledError):
        print("medfmsegment: cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a full disk, a permission taken away mid-run: the user's to fix
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"medfmsegment: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print("medfmsegment: error: out of memory (try --device cpu or a smaller image)", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - last line of defence for users; debug mode re-raises
        if os.environ.get("MEDFMSEGMENT_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"medfmsegment: internal error: {type(exc).__name__}: {message} "
              "(set MEDFMSEGMENT_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns the exit code.

    A malformed command line exits through argparse (:class:`SystemExit`, code 2)."""
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.handler(args))


def entry_point() -> None:
    """The ``medfmsegment`` console script."""
    sys.exit(main())
