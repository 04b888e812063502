"""``python -m bench SUITE [options]``: run one benchmark suite, or ``report`` to rebuild the docs.

Suites are found by module name: every ``bench/<name>.py`` that defines ``main`` is one, so a new
suite needs no change here. ``--help`` lists them with the first line of each module's docstring,
read without importing the module (importing a suite loads torch).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

__all__ = ["suites", "main"]

HERE = Path(__file__).resolve().parent
NOT_SUITES = {"common", "data", "report", "plots"}


def suites() -> dict[str, str]:
    """``{name: one-line description}`` of every suite module in ``bench/``, sorted by name."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name in NOT_SUITES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            doc = ast.get_docstring(tree) or ""
            found[name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def _usage() -> str:
    lines = ["usage: python -m bench SUITE [options]   (python -m bench SUITE --help for a suite's options)",
             "       python -m bench report [--check]  (results -> docs/benchmarks.md, plots, README table)",
             "", "suites:"]
    width = max(len(name) for name in suites())
    lines += [f"  {name:<{width}}  {doc}" for name, doc in suites().items()]
    lines += ["", "Results: bench/results/<suite>.json (machine, commit, versions, settings and figures)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name != "report" and name not in suites():
        print(f"unknown suite {name!r}; suites: {', '.join(suites())}, or report", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
