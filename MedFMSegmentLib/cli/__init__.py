"""The ``medfmsegment`` command line: argparse lives here and nowhere else in the library.

* :mod:`.main`: the parser (subcommands registered statically: a missing module fails at import;
  each one's options added when it is used, so ``--help`` imports no torch), :func:`main`, the
  console script's :func:`entry_point` and the error guard.
* :mod:`.options`: options several subcommands share, their choices and defaults taken from the
  library's registries; the exit codes.
* One module per subcommand, named after it, each with ``HELP``, ``DESCRIPTION``,
  ``add_arguments(parser)`` and ``run(args)``: :mod:`.segment`, :mod:`.info`, :mod:`.demo`,
  :mod:`.finetune`, :mod:`.evaluate`, :mod:`.batch` (with the cohort options of :mod:`.cohort`)
  and :mod:`.serve`. They parse; the work is the library's.
"""

from .main import COMMANDS, build_parser, entry_point, main, run_guarded
from .options import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser",
           "entry_point", "main", "run_guarded"]
