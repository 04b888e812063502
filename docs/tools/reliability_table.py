"""Generate the coverage table of ``docs/reliability.md`` from the reliability tests' ids.

The ids come from ``pytest --collect-only -q`` over the reliability modules; each matrix row's
defect and one-line description come from its registration (``reliability_support.ROWS``), every
other test's from the first line of its docstring. ``python docs/tools/reliability_table.py``
rewrites the table in place; ``Testing/Python/test_reliability_docs.py`` checks it is current.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["MODULES", "collect_ids", "table", "rewrite", "main"]

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "Testing" / "Python"
DOC = ROOT / "docs" / "reliability.md"
MODULES = ("test_reliability_matrix.py", "test_reliability_files.py", "test_properties.py", "test_kill.py")
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"


def collect_ids() -> list[str]:
    """``module::test[param]`` ids of the reliability tests, in collection order."""
    completed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *(str(TESTS / m) for m in MODULES)], capture_output=True, text=True, cwd=ROOT)
    ids = [line.strip() for line in completed.stdout.splitlines() if "::" in line]
    if not ids:
        raise RuntimeError(f"no tests collected: {completed.stdout[-500:]} {completed.stderr[-500:]}")
    return [re.sub(r"^.*Testing/Python/", "", i) for i in ids]


def _docstrings(module: str) -> dict[str, str]:
    tree = ast.parse((TESTS / module).read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            doc = ast.get_docstring(node) or node.name.replace("test_", "").replace("_", " ")
            found[node.name] = doc.strip().splitlines()[0]
    return found


def _rows() -> dict[str, tuple[str, str]]:
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(ROOT))
    import reliability_rows_inputs  # noqa: F401  (registers rows)
    import reliability_rows_outputs  # noqa: F401
    from reliability_support import ROWS

    return {r.id: (r.defect, r.what) for r in ROWS}


def table(ids: list[str] | None = None) -> str:
    """The markdown table: one line per test id."""
    ids = collect_ids() if ids is None else ids
    rows = _rows()
    docs = {m: _docstrings(m) for m in MODULES}
    lines = ["| test | defect (issue 24) | what holds |", "| --- | --- | --- |"]
    for test_id in ids:
        module, name = test_id.split("::", 1)
        function, _, param = name.partition("[")
        param = param.rstrip("]")
        if param in rows and function == "test_matrix":
            defect, what = rows[param]
        else:
            defect, what = "-", docs[module].get(function, "")
        defect = "already held" if defect == "holds" else defect
        lines.append(f"| `{test_id}` | {defect} | {what.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def rewrite(path: Path = DOC) -> bool:
    """Replace the table between the markers of ``path``; True when it changed."""
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table()}{END}{tail}"
    path.write_text(new, encoding="utf-8")
    return new != text


def main() -> int:
    print("updated" if rewrite() else "unchanged", DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
